//! The HTTP front: routing, the fault knobs, and the `/v1` methods of Google's Pub/Sub
//! REST reference (<https://cloud.google.com/pubsub/docs/reference/rest>):
//!
//! * `projects.topics`: `create` (`PUT /v1/{name}`), `get`, `delete`, `list`,
//!   `publish` (`POST /v1/{topic}:publish`), and `projects.topics.subscriptions.list`;
//! * `projects.subscriptions`: `create` (`PUT /v1/{name}`), `get`, `delete`, `list`,
//!   `pull`, `acknowledge`, `modifyAckDeadline` (`POST /v1/{subscription}:verb`).
//!
//! Validation follows the reference pages of those methods and of the `Topic`,
//! `Subscription`, `PubsubMessage` and `ExpirationPolicy` types, the "Resource names"
//! rules (<https://cloud.google.com/pubsub/docs/pubsub-basics#resource_names>) and the
//! "Quotas and limits" page (1000 messages and 10 MB per publish, 100 attributes per
//! message, 256-byte keys, 1024-byte values, 1024-byte ordering keys). Errors use
//! Google's JSON error shape (<https://cloud.google.com/apis/design/errors>).

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::auth::{self, Bearer};
use crate::federation;
use crate::json::{self, Obj, secs};
use crate::percent::percent_decode;
use crate::records::{Credential, RequestRecord};
use crate::reply::{ApiError, Reply};
use crate::state::{AckId, Shared, Subscription};

/// Google's limit on a publish request, applied to every request body.
const MAX_BODY: usize = 10 * 1024 * 1024;
const MAX_MESSAGES_PER_PUBLISH: usize = 1000;
const MAX_ATTRIBUTES: usize = 100;
const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
const MAX_ORDERING_KEY_BYTES: usize = 1024;
/// The real service never returns more than this many messages per pull.
const MAX_PULL_BATCH: usize = 1000;
const DEFAULT_ACK_DEADLINE: u64 = 10;
const MAX_ACK_DEADLINE: u64 = 600;
const MIN_RETENTION: u128 = secs(600);
const MAX_RETENTION: u128 = secs(31 * 86_400);
const DEFAULT_RETENTION: u128 = secs(7 * 86_400);
const MIN_TTL: u128 = secs(86_400);
const MAX_TTL: u128 = secs(365 * 86_400);
const DEFAULT_TTL: u128 = secs(31 * 86_400);

/// Answers one HTTP request (on its own thread) and records it.
pub(crate) fn handle(shared: &Shared, mut request: tiny_http::Request) {
    let method = request.method().as_str().to_ascii_uppercase();
    let target = request.url().to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_ascii_lowercase(),
                h.value.as_str().to_owned(),
            )
        })
        .collect();

    let (reply, credential) = match read_body(&mut request) {
        Err(e) => (e.into_reply(), None),
        Ok(body) if path == "/token" => {
            (auth::token_endpoint(shared, &method, &headers, &body), None)
        }
        // Google's STS and IAM Credentials, on this server's base URL.
        Ok(body) if path == "/v1/token" => {
            (federation::sts(shared, &method, &headers, &body), None)
        }
        Ok(body) if federation::is_iam_path(path) => {
            federation::generate_access_token(shared, &method, path, &headers, &body)
        }
        Ok(body) if path == "/v1" || path.starts_with("/v1/") => {
            v1(shared, &method, path, query, &headers, &body)
        }
        Ok(_) => (
            ApiError::new(
                404,
                format!("The requested URL {path} was not found on this server."),
            )
            .into_reply(),
            None,
        ),
    };

    {
        let mut state = shared.lock();
        state.requests.push(RequestRecord {
            method,
            path: path.to_owned(),
            status: reply.status,
            authorized: credential.is_some(),
            credential,
        });
        shared.notify(&mut state);
    }

    // Google pretty-prints unless asked not to (`?prettyPrint=false`).
    let compact = query_pairs(query)
        .unwrap_or_default()
        .iter()
        .any(|(k, v)| k == "prettyPrint" && v == "false");
    let bytes = if compact {
        serde_json::to_vec(&reply.body)
    } else {
        serde_json::to_vec_pretty(&reply.body)
    }
    .unwrap_or_default();
    let mut response = tiny_http::Response::from_data(bytes).with_status_code(reply.status);
    let content_type = [("Content-Type", "application/json; charset=UTF-8".to_owned())];
    for (name, value) in content_type.iter().chain(reply.headers.iter()) {
        if let Ok(header) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(header);
        }
    }
    // The client may have gone away (e.g. it timed out a held pull); nothing to do then.
    let _ = request.respond(response);
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::invalid(format!("Could not read the request body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(ApiError::invalid(format!(
            "Request payload size exceeds the limit: {MAX_BODY} bytes."
        )));
    }
    Ok(body)
}

/// A `/v1` call: token check, then the knobs (delay, injected failure), then the API.
/// Returns the answer and what the bearer token was accepted as.
fn v1(
    shared: &Shared,
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (Reply, Option<Credential>) {
    let bearer = auth::check_bearer(shared, headers);
    let accepted = match &bearer {
        Bearer::Valid(credential) => Some(credential.clone()),
        _ => None,
    };

    pause(shared);
    if let Some(error) = injected_failure(shared) {
        return (error.into_reply(), accepted);
    }
    if shared.requires_auth() {
        match bearer {
            Bearer::Valid(_) => {}
            Bearer::Missing => {
                let e = ApiError::unauthenticated(true, "no Authorization header");
                return (e.into_reply(), None);
            }
            Bearer::Invalid(reason) => {
                return (ApiError::unauthenticated(false, &reason).into_reply(), None);
            }
            Bearer::Forbidden(reason) => return (ApiError::new(403, reason).into_reply(), None),
        }
    }
    let reply = route(shared, method, path, query, body).unwrap_or_else(ApiError::into_reply);
    (reply, accepted)
}

/// Sleeps for the configured delay, but wakes early when the server shuts down.
fn pause(shared: &Shared) {
    let mut state = shared.lock();
    if state.delay.is_zero() {
        return;
    }
    let until = Instant::now() + state.delay;
    while !shared.is_shutting_down() {
        let now = Instant::now();
        if now >= until {
            return;
        }
        state = shared.wait_timeout(state, until - now);
    }
}

fn injected_failure(shared: &Shared) -> Option<ApiError> {
    let mut state = shared.lock();
    if let Some(status) = state.outage_at(Instant::now()) {
        return Some(ApiError::injected(status));
    }
    if state.fail_next == 0 {
        return None;
    }
    state.fail_next -= 1;
    let code = state.fail_status;
    shared.notify(&mut state);
    Some(ApiError::injected(code))
}

fn route(
    shared: &Shared,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let segments: Vec<&str> = path.strip_prefix("/v1/").unwrap_or("").split('/').collect();
    let not_found = || {
        ApiError::new(
            404,
            format!("The requested URL {path} was not found on this server."),
        )
    };
    match segments.as_slice() {
        [
            "projects",
            project,
            collection @ ("topics" | "subscriptions"),
        ] => {
            only(method, "GET")?;
            check_query(query)?;
            list(shared, &project_id(project)?, collection)
        }
        ["projects", project, "topics", topic, "subscriptions"] => {
            only(method, "GET")?;
            check_query(query)?;
            let topic = resource_name(project, topic, "topics")?;
            topic_subscriptions(shared, &topic)
        }
        ["projects", project, "topics", last] => {
            let (id, verb) = split_verb(last);
            match verb {
                None => {
                    if !["PUT", "GET", "DELETE", "PATCH"].contains(&method) {
                        return Err(ApiError::method_not_allowed(
                            method,
                            "PUT, GET, PATCH, DELETE",
                        ));
                    }
                    check_query(query)?;
                    let name = resource_name(project, id, "topics")?;
                    match method {
                        "PUT" => create_topic(shared, &name, body),
                        "GET" => get_topic(shared, &name),
                        "DELETE" => delete_topic(shared, &name),
                        _ => Err(ApiError::not_emulated("projects.topics.patch")),
                    }
                }
                Some("publish") => {
                    only(method, "POST")?;
                    check_query(query)?;
                    publish(shared, &resource_name(project, id, "topics")?, body)
                }
                Some(verb @ ("getIamPolicy" | "setIamPolicy" | "testIamPermissions")) => {
                    Err(ApiError::not_emulated(&format!("projects.topics.{verb}")))
                }
                Some(_) => Err(not_found()),
            }
        }
        ["projects", project, "subscriptions", last] => {
            let (id, verb) = split_verb(last);
            match verb {
                None => {
                    if !["PUT", "GET", "DELETE", "PATCH"].contains(&method) {
                        return Err(ApiError::method_not_allowed(
                            method,
                            "PUT, GET, PATCH, DELETE",
                        ));
                    }
                    check_query(query)?;
                    let name = resource_name(project, id, "subscriptions")?;
                    match method {
                        "PUT" => create_subscription(shared, &name, body),
                        "GET" => get_subscription(shared, &name),
                        "DELETE" => delete_subscription(shared, &name),
                        _ => Err(ApiError::not_emulated("projects.subscriptions.patch")),
                    }
                }
                Some(verb @ ("pull" | "acknowledge" | "modifyAckDeadline")) => {
                    only(method, "POST")?;
                    check_query(query)?;
                    let name = resource_name(project, id, "subscriptions")?;
                    match verb {
                        "pull" => pull(shared, &name, body),
                        "acknowledge" => acknowledge(shared, &name, body),
                        _ => modify_ack_deadline(shared, &name, body),
                    }
                }
                Some(
                    verb @ ("modifyPushConfig" | "seek" | "detach" | "getIamPolicy"
                    | "setIamPolicy" | "testIamPermissions"),
                ) => Err(ApiError::not_emulated(&format!(
                    "projects.subscriptions.{verb}"
                ))),
                Some(_) => Err(not_found()),
            }
        }
        _ => Err(not_found()),
    }
}

fn only(method: &str, allowed: &'static str) -> Result<(), ApiError> {
    if method == allowed {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(method, allowed))
    }
}

/// `"name:verb"` -> `("name", Some("verb"))`. Resource IDs cannot contain ':', so the
/// first colon of the (still percent-encoded) segment starts the verb.
fn split_verb(segment: &str) -> (&str, Option<&str>) {
    match segment.split_once(':') {
        Some((id, verb)) => (id, Some(verb)),
        None => (segment, None),
    }
}

/// Google's system parameters are accepted; any other query parameter is an error, as
/// the real front end cannot bind it to a request field.
fn check_query(query: &str) -> Result<(), ApiError> {
    let pairs = query_pairs(query).ok_or_else(|| {
        ApiError::invalid("Malformed percent-encoding in the query string.".into())
    })?;
    for (key, value) in pairs {
        let ok = match key.as_str() {
            "alt" => value == "json",
            "prettyPrint" => value == "true" || value == "false",
            "$.xgafv" => value == "1" || value == "2",
            // `fields` would filter the response; it is accepted and ignored.
            "fields" | "quotaUser" => true,
            "pageSize" => value.parse::<u32>().is_ok(),
            // Lists are never paged here, so no page token was ever handed out.
            "pageToken" => value.is_empty(),
            _ => {
                return Err(ApiError::invalid(format!(
                    "Invalid JSON payload received. Unknown name \"{key}\": Cannot bind query \
                     parameter. Field '{key}' could not be found in request message."
                )));
            }
        };
        if !ok {
            return Err(ApiError::invalid(format!(
                "Invalid value for query parameter {key}: \"{value}\""
            )));
        }
    }
    Ok(())
}

fn query_pairs(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((
                percent_decode(&k.replace('+', " "))?,
                percent_decode(&v.replace('+', " "))?,
            ))
        })
        .collect()
}

fn decode_segment(raw: &str) -> Result<String, ApiError> {
    percent_decode(raw)
        .ok_or_else(|| ApiError::invalid(format!("Malformed percent-encoding in the URL: {raw}")))
}

/// A project ID (6-30 chars of `[a-z0-9-]`, starting with a letter, not ending with
/// '-') or a project number. Short IDs are allowed too, since test configs like
/// `projects/test` are common and harmless; everything else is refused.
fn project_id(raw: &str) -> Result<String, ApiError> {
    let project = decode_segment(raw)?;
    let is_number = !project.is_empty() && project.bytes().all(|b| b.is_ascii_digit());
    let is_id = project.len() <= 30
        && project.starts_with(|c: char| c.is_ascii_lowercase())
        && !project.ends_with('-')
        && project
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if is_number || is_id {
        Ok(project)
    } else {
        Err(ApiError::invalid(format!(
            "Invalid project name: (name=projects/{project}). A project ID has up to 30 \
             lowercase letters, digits or hyphens, starts with a letter and does not end \
             with a hyphen."
        )))
    }
}

/// Why a topic or subscription ID breaks Google's resource-name rules, if it does.
fn resource_id_problem(id: &str) -> Option<&'static str> {
    if !(3..=255).contains(&id.len()) {
        return Some("IDs must be between 3 and 255 characters long.");
    }
    if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Some("IDs must start with a letter.");
    }
    if id.starts_with("goog") {
        return Some("IDs must not start with \"goog\".");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.~+%".contains(c);
    if !id.chars().all(allowed) {
        return Some(
            "IDs may contain only letters, numbers, dashes (-), underscores (_), periods (.), \
             tildes (~), plus (+) or percent signs (%).",
        );
    }
    None
}

/// Decodes and validates `projects/{project}/{collection}/{id}` from URL segments.
fn resource_name(project: &str, id: &str, collection: &str) -> Result<String, ApiError> {
    let project = project_id(project)?;
    let id = decode_segment(id)?;
    let name = format!("projects/{project}/{collection}/{id}");
    match resource_id_problem(&id) {
        None => Ok(name),
        Some(problem) => Err(ApiError::invalid(format!(
            "Invalid [{collection}] name: (name={name}). {problem}"
        ))),
    }
}

/// Validates a full topic name given in a request body.
fn topic_name_in_body(name: &str) -> Result<String, ApiError> {
    let invalid = || ApiError::invalid(format!("Invalid [topics] name: (name={name})"));
    match name.split('/').collect::<Vec<_>>().as_slice() {
        ["projects", project, "topics", id] => {
            if project.contains('%') {
                return Err(invalid());
            }
            let project = project_id(project).map_err(|_| invalid())?;
            match resource_id_problem(id) {
                None => Ok(format!("projects/{project}/topics/{id}")),
                Some(problem) => Err(ApiError::invalid(format!(
                    "Invalid [topics] name: (name={name}). {problem}"
                ))),
            }
        }
        _ => Err(invalid()),
    }
}

/// The last path segment of a resource name: its ID.
fn short(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// Label rules shared by all Google Cloud resources: at most 64 labels; keys 1-63
/// chars starting with a lowercase letter; keys and values of lowercase letters,
/// digits, '_' and '-' (values may be empty).
fn check_labels(labels: &Obj, at: &str) -> Result<(), ApiError> {
    if labels.len() > 64 {
        return Err(ApiError::invalid(format!(
            "Invalid {at}.labels: at most 64 labels are allowed."
        )));
    }
    let chars_ok = |s: &str| {
        s.chars()
            .all(|c| c.is_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    for (key, value) in labels {
        let value = value.as_str().unwrap_or_default();
        let key_ok = (1..=63).contains(&key.chars().count())
            && key.starts_with(char::is_lowercase)
            && chars_ok(key);
        let value_ok = value.chars().count() <= 63 && chars_ok(value);
        if !key_ok || !value_ok {
            return Err(ApiError::invalid(format!(
                "Invalid {at}.labels entry \"{key}\": \"{value}\". Keys are 1-63 lowercase \
                 letters, digits, '_' or '-' starting with a letter; values up to 63 of those."
            )));
        }
    }
    Ok(())
}

/// Fields that exist on a resource but whose behaviour is not modelled: present and
/// non-empty means 400.
fn refuse_unemulated(obj: &Obj, names: &[&str], kind: &str) -> Result<(), ApiError> {
    for name in names {
        let set = match obj.get(*name) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(ApiError::not_emulated(&format!("{kind}.{name}")));
        }
    }
    Ok(())
}

fn list(shared: &Shared, project: &str, collection: &str) -> Result<Reply, ApiError> {
    let prefix = format!("projects/{project}/{collection}/");
    let state = shared.lock();
    let items: Vec<Value> = if collection == "topics" {
        state
            .topics
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, t)| t.clone())
            .collect()
    } else {
        state
            .subscriptions
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, s)| s.resource.clone())
            .collect()
    };
    // Empty repeated fields are left out of Google's JSON.
    let body = if items.is_empty() {
        json!({})
    } else {
        json!({ collection: items })
    };
    Ok(Reply::json(200, body))
}

fn topic_subscriptions(shared: &Shared, topic: &str) -> Result<Reply, ApiError> {
    let state = shared.lock();
    if !state.topics.contains_key(topic) {
        return Err(ApiError::not_found(short(topic)));
    }
    let names: Vec<&String> = state
        .subscriptions
        .iter()
        .filter(|(_, s)| s.topic.as_deref() == Some(topic))
        .map(|(name, _)| name)
        .collect();
    let body = if names.is_empty() {
        json!({})
    } else {
        json!({ "subscriptions": names })
    };
    Ok(Reply::json(200, body))
}

const TOPIC_FIELDS: &[&str] = &[
    "name",
    "labels",
    "messageStoragePolicy",
    "kmsKeyName",
    "schemaSettings",
    "satisfiesPzs",
    "messageRetentionDuration",
    "state",
    "ingestionDataSourceSettings",
    "messageTransforms",
];

/// The next create of a topic or subscription fails as `abort_next_creates`
/// or `deny_topic_creates` asks.
fn create_refused(shared: &Shared, topic: bool) -> Option<ApiError> {
    let mut state = shared.lock();
    if topic && state.deny_topic_creates {
        return Some(ApiError::topic_create_denied());
    }
    if state.abort_creates > 0 {
        state.abort_creates -= 1;
        return Some(ApiError::aborted());
    }
    None
}

fn create_topic(shared: &Shared, name: &str, body: &[u8]) -> Result<Reply, ApiError> {
    if let Some(refused) = create_refused(shared, true) {
        return Err(refused);
    }
    let obj = json::fields(&json::parse_body(body)?, TOPIC_FIELDS, "topic")?;
    refuse_unemulated(
        &obj,
        &[
            "messageStoragePolicy",
            "kmsKeyName",
            "schemaSettings",
            "ingestionDataSourceSettings",
            "messageTransforms",
        ],
        "Topic",
    )?;
    // `name` in the body is overridden by the URL (REST transcoding); `satisfiesPzs`
    // and `state` are output only. They are type-checked and otherwise ignored.
    json::string(&obj, "name", "topic")?;
    json::boolean(&obj, "satisfiesPzs", "topic")?;
    json::string(&obj, "state", "topic")?;

    let mut resource = Obj::new();
    resource.insert("name".into(), json!(name));
    if let Some(labels) = json::string_map(&obj, "labels", "topic")? {
        check_labels(&labels, "topic")?;
        if !labels.is_empty() {
            resource.insert("labels".into(), Value::Object(labels));
        }
    }
    if let Some(retention) = json::duration(&obj, "messageRetentionDuration", "topic")? {
        check_retention(retention)?;
        resource.insert(
            "messageRetentionDuration".into(),
            json!(json::format_duration(retention)),
        );
    }
    let resource = Value::Object(resource);

    let mut state = shared.lock();
    if state.topics.contains_key(name) {
        return Err(ApiError::already_exists(short(name)));
    }
    state.topics.insert(name.to_owned(), resource.clone());
    shared.notify(&mut state);
    Ok(Reply::json(200, resource))
}

fn get_topic(shared: &Shared, name: &str) -> Result<Reply, ApiError> {
    let state = shared.lock();
    match state.topics.get(name) {
        Some(topic) => Ok(Reply::json(200, topic.clone())),
        None => Err(ApiError::not_found(short(name))),
    }
}

fn delete_topic(shared: &Shared, name: &str) -> Result<Reply, ApiError> {
    let mut state = shared.lock();
    if !state.delete_topic(name) {
        return Err(ApiError::not_found(short(name)));
    }
    shared.notify(&mut state);
    Ok(Reply::json(200, json!({})))
}

/// A message validated and decoded, ready to be stored.
struct Outgoing {
    data: Vec<u8>,
    data_b64: Option<String>,
    attributes: Option<Obj>,
    ordering_key: Option<String>,
}

fn publish(shared: &Shared, topic: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = json::fields(&json::parse_body(body)?, &["messages"], "")?;
    let messages = json::array(&obj, "messages", "")?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "The value for message_count is too small. You passed 0 in the request, but the \
             minimum value is 1."
                .into(),
        ));
    }
    if messages.len() > MAX_MESSAGES_PER_PUBLISH {
        return Err(ApiError::invalid(format!(
            "The value for message_count is too large. You passed {} in the request, but the \
             maximum value is {MAX_MESSAGES_PER_PUBLISH}.",
            messages.len()
        )));
    }
    let outgoing = messages
        .iter()
        .enumerate()
        .map(|(i, m)| outgoing_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;

    let mut state = shared.lock();
    if let Some(refusal) = state.publish_refusal {
        return Err(ApiError::refused(refusal));
    }
    if !state.topics.contains_key(topic) {
        return Err(ApiError::not_found(short(topic)));
    }
    let ids: Vec<String> = outgoing
        .into_iter()
        .map(|m| state.publish(topic, m.data, m.data_b64, m.attributes, m.ordering_key))
        .collect();
    let lost = state.lose_publish_answers > 0;
    if lost {
        state.lose_publish_answers -= 1;
    }
    shared.notify(&mut state);
    if lost {
        return Err(ApiError::answer_lost());
    }
    Ok(Reply::json(200, json!({ "messageIds": ids })))
}

fn outgoing_message(i: usize, message: &Value) -> Result<Outgoing, ApiError> {
    let at = format!("messages[{i}]");
    let Value::Object(message) = message else {
        return Err(ApiError::invalid(format!(
            "Invalid value at '{at}' (type.googleapis.com/google.pubsub.v1.PubsubMessage), \
             {message}"
        )));
    };
    let m = json::fields(
        message,
        &[
            "data",
            "attributes",
            "messageId",
            "publishTime",
            "orderingKey",
        ],
        &at,
    )?;
    // messageId and publishTime are set by the service; clients' values are ignored.
    json::string(&m, "messageId", &at)?;
    json::string(&m, "publishTime", &at)?;

    let data = match json::string(&m, "data", &at)? {
        None => Vec::new(),
        // Standard alphabet with canonical padding only. (Google's proto3 JSON parser
        // would also take URL-safe or unpadded base64; a client that relies on that is
        // still fine there, but this server wants the form the reference documents.)
        Some(b64) => STANDARD.decode(b64).map_err(|e| {
            ApiError::invalid(format!(
                "Invalid value at '{at}.data' (TYPE_BYTES), Base64 decoding failed for \
                 \"{}\": {e}",
                b64.chars().take(64).collect::<String>()
            ))
        })?,
    };
    let attributes = json::string_map(&m, "attributes", &at)?.filter(|a| !a.is_empty());
    if let Some(attributes) = &attributes {
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(ApiError::invalid(format!(
                "Invalid {at}: a message may have at most {MAX_ATTRIBUTES} attributes, it has {}.",
                attributes.len()
            )));
        }
        for (key, value) in attributes {
            let value = value.as_str().unwrap_or_default();
            if key.len() > MAX_ATTRIBUTE_KEY_BYTES || value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                return Err(ApiError::invalid(format!(
                    "Invalid {at}.attributes[{key}]: keys may have at most \
                     {MAX_ATTRIBUTE_KEY_BYTES} bytes and values at most \
                     {MAX_ATTRIBUTE_VALUE_BYTES} bytes."
                )));
            }
        }
    }
    if data.is_empty() && attributes.is_none() {
        return Err(ApiError::invalid(format!(
            "Some messages in the publish request are empty ({at}). Each message must contain \
             either non-empty data, or at least one attribute."
        )));
    }
    let ordering_key = json::string(&m, "orderingKey", &at)?
        .filter(|k| !k.is_empty())
        .map(str::to_owned);
    if ordering_key
        .as_ref()
        .is_some_and(|k| k.len() > MAX_ORDERING_KEY_BYTES)
    {
        return Err(ApiError::invalid(format!(
            "Invalid {at}.ordering_key: at most {MAX_ORDERING_KEY_BYTES} bytes."
        )));
    }
    let data_b64 = (!data.is_empty()).then(|| STANDARD.encode(&data));
    Ok(Outgoing {
        data,
        data_b64,
        attributes,
        ordering_key,
    })
}

const SUBSCRIPTION_FIELDS: &[&str] = &[
    "name",
    "topic",
    "pushConfig",
    "bigqueryConfig",
    "cloudStorageConfig",
    "ackDeadlineSeconds",
    "retainAckedMessages",
    "messageRetentionDuration",
    "labels",
    "enableMessageOrdering",
    "expirationPolicy",
    "filter",
    "deadLetterPolicy",
    "retryPolicy",
    "detached",
    "enableExactlyOnceDelivery",
    "topicMessageRetentionDuration",
    "state",
    "analyticsHubSubscriptionInfo",
    "messageTransforms",
];

fn check_retention(retention: u128) -> Result<(), ApiError> {
    if (MIN_RETENTION..=MAX_RETENTION).contains(&retention) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "Invalid message_retention_duration ({}): it must be between 600s (10 minutes) and \
             2678400s (31 days).",
            json::format_duration(retention)
        )))
    }
}

fn create_subscription(shared: &Shared, name: &str, body: &[u8]) -> Result<Reply, ApiError> {
    if let Some(refused) = create_refused(shared, false) {
        return Err(refused);
    }
    const AT: &str = "subscription";
    let obj = json::fields(&json::parse_body(body)?, SUBSCRIPTION_FIELDS, AT)?;
    refuse_unemulated(
        &obj,
        &[
            "pushConfig",
            "bigqueryConfig",
            "cloudStorageConfig",
            "filter",
            "deadLetterPolicy",
            "retryPolicy",
            "detached",
            "enableExactlyOnceDelivery",
            "analyticsHubSubscriptionInfo",
            "messageTransforms",
        ],
        "Subscription",
    )?;
    // Overridden by the URL / output only: type-checked, otherwise ignored.
    json::string(&obj, "name", AT)?;
    json::string(&obj, "state", AT)?;
    json::duration(&obj, "topicMessageRetentionDuration", AT)?;

    let topic = match json::string(&obj, "topic", AT)? {
        None | Some("") => {
            return Err(ApiError::invalid(
                "Invalid subscription: topic is required (projects/{project}/topics/{topic})."
                    .into(),
            ));
        }
        Some(topic) => topic_name_in_body(topic)?,
    };

    // 0 (the proto3 default, i.e. absent) means the default of 10 s, per the reference.
    let ack_deadline = match json::int32(&obj, "ackDeadlineSeconds", AT)? {
        None | Some(0) => DEFAULT_ACK_DEADLINE,
        Some(s) if (DEFAULT_ACK_DEADLINE as i32..=MAX_ACK_DEADLINE as i32).contains(&s) => s as u64,
        Some(s) => {
            return Err(ApiError::invalid(format!(
                "Invalid ack_deadline_seconds: {s}. It must be between 10 and 600 seconds."
            )));
        }
    };

    let retention =
        json::duration(&obj, "messageRetentionDuration", AT)?.unwrap_or(DEFAULT_RETENTION);
    check_retention(retention)?;

    // Absent policy: the default 31-day TTL. A policy without ttl: never expires.
    let expiration = match json::object(&obj, "expirationPolicy", AT)? {
        None => json!({"ttl": json::format_duration(DEFAULT_TTL)}),
        Some(policy) => {
            let at = "subscription.expiration_policy";
            let policy = json::fields(policy, &["ttl"], at)?;
            match json::duration(&policy, "ttl", at)? {
                None => json!({}),
                Some(ttl) => {
                    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
                        return Err(ApiError::invalid(format!(
                            "Invalid expiration_policy.ttl ({}): it must be between 1 day \
                             (86400s) and 365 days (31536000s), or unset for no expiration.",
                            json::format_duration(ttl)
                        )));
                    }
                    if ttl < retention {
                        return Err(ApiError::invalid(format!(
                            "Invalid expiration_policy.ttl ({}): it must not be shorter than \
                             message_retention_duration ({}).",
                            json::format_duration(ttl),
                            json::format_duration(retention)
                        )));
                    }
                    json!({"ttl": json::format_duration(ttl)})
                }
            }
        }
    };

    let mut resource = Obj::new();
    resource.insert("name".into(), json!(name));
    resource.insert("topic".into(), json!(topic));
    resource.insert("pushConfig".into(), json!({}));
    resource.insert("ackDeadlineSeconds".into(), json!(ack_deadline));
    if json::boolean(&obj, "retainAckedMessages", AT)? == Some(true) {
        resource.insert("retainAckedMessages".into(), json!(true));
    }
    resource.insert(
        "messageRetentionDuration".into(),
        json!(json::format_duration(retention)),
    );
    if let Some(labels) = json::string_map(&obj, "labels", AT)? {
        check_labels(&labels, AT)?;
        if !labels.is_empty() {
            resource.insert("labels".into(), Value::Object(labels));
        }
    }
    if json::boolean(&obj, "enableMessageOrdering", AT)? == Some(true) {
        resource.insert("enableMessageOrdering".into(), json!(true));
    }
    resource.insert("expirationPolicy".into(), expiration);
    resource.insert("state".into(), json!("ACTIVE"));
    let resource = Value::Object(resource);

    let mut state = shared.lock();
    if state.subscriptions.contains_key(name) {
        return Err(ApiError::already_exists(short(name)));
    }
    if !state.topics.contains_key(&topic) {
        return Err(ApiError::not_found(short(&topic)));
    }
    let uid = state.next_uid();
    let sub = Subscription::new(
        uid,
        topic,
        Duration::from_secs(ack_deadline),
        resource.clone(),
    );
    state.subscriptions.insert(name.to_owned(), sub);
    shared.notify(&mut state);
    Ok(Reply::json(200, resource))
}

fn get_subscription(shared: &Shared, name: &str) -> Result<Reply, ApiError> {
    let state = shared.lock();
    match state.subscriptions.get(name) {
        Some(sub) => Ok(Reply::json(200, sub.resource.clone())),
        None => Err(ApiError::not_found(short(name))),
    }
}

fn delete_subscription(shared: &Shared, name: &str) -> Result<Reply, ApiError> {
    let mut state = shared.lock();
    if state.subscriptions.remove(name).is_none() {
        return Err(ApiError::not_found(short(name)));
    }
    // Wakes held pulls on it, which then answer 404.
    shared.notify(&mut state);
    Ok(Reply::json(200, json!({})))
}

fn pull(shared: &Shared, name: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = json::fields(
        &json::parse_body(body)?,
        &["maxMessages", "returnImmediately"],
        "",
    )?;
    let max = json::int32(&obj, "maxMessages", "")?.unwrap_or(0);
    if max <= 0 {
        return Err(ApiError::invalid(format!(
            "The value for max_messages is too small. You passed {max} in the request, but \
             the minimum value is 1."
        )));
    }
    let max = (max as usize).min(MAX_PULL_BATCH);
    let immediate = json::boolean(&obj, "returnImmediately", "")?.unwrap_or(false)
        || shared.pulls_return_immediately;
    let start = Instant::now();
    let hold_until = start
        .checked_add(shared.max_pull_hold)
        .unwrap_or(start + Duration::from_secs(86_400));

    let mut state = shared.lock();
    let Some(uid) = state.subscriptions.get(name).map(|s| s.uid) else {
        return Err(ApiError::not_found(short(name)));
    };
    let mut holding = false;
    let result = loop {
        if shared.is_shutting_down() {
            break Ok(Reply::json(200, json!({})));
        }
        let now = Instant::now();
        let nonce = state.nonce;
        let fill_wait = state.pull_fill_wait;
        // The same subscription, not a new one created under the same name meanwhile.
        let Some(sub) = state.subscriptions.get_mut(name).filter(|s| s.uid == uid) else {
            break Err(ApiError::not_found(short(name)));
        };
        sub.expire_leases(now);
        // A pull held when an outage begins fails like every other call.
        if let Some(status) = state.outage_at(now) {
            break Err(ApiError::injected(status));
        }
        let Some(sub) = state.subscriptions.get_mut(name).filter(|s| s.uid == uid) else {
            break Err(ApiError::not_found(short(name)));
        };
        // With a fill wait, a pull that has messages still holds them until its batch
        // is full or the wait (counted from the start of the pull, re-read each time so
        // `set_pull_fill_wait` reaches held pulls) is over. The messages stay pending
        // meanwhile, so whichever concurrent pull answers first takes them, and they are
        // leased only by the `deliver` below, under the same lock: never handed twice.
        let fill_until = start
            .checked_add(fill_wait)
            .map_or(hold_until, |t| t.min(hold_until));
        if sub.has_deliverable() && (immediate || now >= fill_until || sub.deliverable() >= max) {
            let received = sub.deliver(max, now, nonce);
            break Ok(Reply::json(200, json!({ "receivedMessages": received })));
        }
        if !sub.has_deliverable() && (immediate || now >= hold_until) {
            // An empty response is the empty message.
            break Ok(Reply::json(200, json!({})));
        }
        // Wake for a publish/nack/delete/knob change (notify), or when a lease expires
        // and its message becomes deliverable again, or at the end of the fill wait
        // (if there is something to fill) or of the hold.
        let until = if sub.has_deliverable() {
            fill_until
        } else {
            hold_until
        };
        let wake = sub.next_lease_expiry().map_or(until, |t| t.min(until));
        if !holding {
            // Announced once per pull (not per wake-up): a broadcast on every re-wait
            // would make concurrent held pulls wake each other forever.
            holding = true;
            state.held_pulls += 1;
            shared.notify(&mut state);
        }
        state = shared.wait_timeout(state, wake.saturating_duration_since(now));
    };
    if holding {
        state.held_pulls -= 1;
    }
    shared.notify(&mut state);
    result
}

/// Decodes ackIds; ids this server could never have issued are a 400, like the real
/// service's "You have passed an invalid ack ID to the service".
fn ack_ids(obj: &Obj, nonce: u64) -> Result<Vec<AckId>, ApiError> {
    let ids = json::strings(obj, "ackIds", "")?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "No ack ids specified: ack_ids must not be empty.".into(),
        ));
    }
    ids.iter()
        .map(|s| {
            AckId::decode(s, nonce).ok_or_else(|| {
                ApiError::invalid(format!(
                    "You have passed an invalid ack ID to the service (ack_id={s})."
                ))
            })
        })
        .collect()
}

fn acknowledge(shared: &Shared, name: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = json::fields(&json::parse_body(body)?, &["ackIds"], "")?;
    let mut state = shared.lock();
    let ids = ack_ids(&obj, state.nonce)?;
    let Some(sub) = state.subscriptions.get_mut(name) else {
        return Err(ApiError::not_found(short(name)));
    };
    // Expired leases first: an ackId whose deadline passed is stale and ignored.
    sub.expire_leases(Instant::now());
    if state.ignore_acks > 0 {
        state.ignore_acks -= 1;
    } else {
        let sub = state.subscriptions.get_mut(name).expect("looked up above");
        for id in ids {
            sub.ack(id);
        }
    }
    shared.notify(&mut state);
    Ok(Reply::json(200, json!({})))
}

fn modify_ack_deadline(shared: &Shared, name: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = json::fields(
        &json::parse_body(body)?,
        &["ackIds", "ackDeadlineSeconds"],
        "",
    )?;
    // Absent is proto3's 0, which is a nack.
    let seconds = json::int32(&obj, "ackDeadlineSeconds", "")?.unwrap_or(0);
    if !(0..=MAX_ACK_DEADLINE as i32).contains(&seconds) {
        return Err(ApiError::invalid(format!(
            "Invalid ack deadline given: {seconds}. It must be between 0 and 600 seconds."
        )));
    }
    let mut state = shared.lock();
    let ids = ack_ids(&obj, state.nonce)?;
    let Some(sub) = state.subscriptions.get_mut(name) else {
        return Err(ApiError::not_found(short(name)));
    };
    let now = Instant::now();
    sub.expire_leases(now);
    for id in ids {
        sub.modify_deadline(id, seconds as u64, now);
    }
    // A nack makes messages deliverable: wake held pulls.
    shared.notify(&mut state);
    Ok(Reply::json(200, json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_follow_googles_rules() {
        for ok in ["abc", "a-b_c.d~e+f%g", "Alerts", &"a".repeat(255)] {
            assert_eq!(resource_id_problem(ok), None, "{ok}");
        }
        for bad in [
            "ab",
            "1abc",
            "googabc",
            "a b c",
            "abc/d",
            "abc:d",
            "ab\u{e9}",
            &"a".repeat(256),
        ] {
            assert!(resource_id_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn project_ids() {
        for ok in ["my-project", "p", "123456", "skywatch-demo-1"] {
            assert!(project_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "My-Project",
            "1abc-",
            "a-",
            "a_b",
            "a%20b",
            &"a".repeat(31),
        ] {
            assert!(project_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_names_in_bodies() {
        assert_eq!(
            topic_name_in_body("projects/p/topics/alerts").unwrap(),
            "projects/p/topics/alerts"
        );
        for bad in [
            "alerts",
            "projects/p/topics/",
            "projects/p/topics/al",
            "projects/p/subscriptions/abc",
            "projects/p/topics/abc/x",
        ] {
            assert!(topic_name_in_body(bad).is_err(), "{bad}");
        }
    }
}
