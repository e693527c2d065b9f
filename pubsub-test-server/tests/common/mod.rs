//! A tiny JSON-over-HTTP client for driving the test server over real loopback HTTP.

#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

pub const TOPIC: &str = "projects/skywatch-test/topics/alerts";
pub const SUB: &str = "projects/skywatch-test/subscriptions/alerts-instance-1";

pub struct Client {
    agent: ureq::Agent,
    base: String,
    bearer: Option<String>,
}

/// Status code and parsed JSON body (`Value::Null` if the body was not JSON).
pub type Answer = (u16, Value);

impl Client {
    pub fn new(base: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            agent,
            base: base.to_owned(),
            bearer: None,
        }
    }

    pub fn with_bearer(base: &str, token: &str) -> Client {
        let mut c = Client::new(base);
        c.bearer = Some(token.to_owned());
        c
    }

    fn finish(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
        let mut response = result.expect("HTTP exchange with the test server");
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .expect("read response body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.bearer {
            Some(token) => req.header("Authorization", format!("Bearer {token}")),
            None => req,
        }
    }

    pub fn get(&self, path: &str) -> Answer {
        Self::finish(
            self.auth(self.agent.get(format!("{}{path}", self.base)))
                .call(),
        )
    }

    pub fn delete(&self, path: &str) -> Answer {
        Self::finish(
            self.auth(self.agent.delete(format!("{}{path}", self.base)))
                .call(),
        )
    }

    pub fn put(&self, path: &str, body: Option<Value>) -> Answer {
        let req = self.auth(self.agent.put(format!("{}{path}", self.base)));
        Self::finish(match body {
            Some(body) => req.send_json(body),
            None => req.send_empty(),
        })
    }

    pub fn post(&self, path: &str, body: Value) -> Answer {
        Self::finish(
            self.auth(self.agent.post(format!("{}{path}", self.base)))
                .send_json(body),
        )
    }

    pub fn post_raw(&self, path: &str, content_type: &str, body: &str) -> Answer {
        Self::finish(
            self.auth(self.agent.post(format!("{}{path}", self.base)))
                .header("Content-Type", content_type)
                .send(body),
        )
    }
}

/// Asserts Google's error shape and returns the message.
pub fn assert_error(answer: &Answer, code: u16, status: &str) -> String {
    assert_eq!(answer.0, code, "unexpected answer {answer:?}");
    let error = &answer.1["error"];
    assert_eq!(error["code"], Value::from(code), "{answer:?}");
    assert_eq!(error["status"], Value::from(status), "{answer:?}");
    error["message"]
        .as_str()
        .expect("error.message is a string")
        .to_owned()
}

/// Creates TOPIC and SUB (ack deadline 10 s).
pub fn topic_and_subscription(client: &Client) {
    assert_eq!(client.put(&format!("/v1/{TOPIC}"), None).0, 200);
    let created = client.put(
        &format!("/v1/{SUB}"),
        Some(json!({"topic": TOPIC, "ackDeadlineSeconds": 10})),
    );
    assert_eq!(created.0, 200, "{created:?}");
}

/// Publishes to TOPIC; returns the messageIds.
pub fn publish(client: &Client, payloads: &[&[u8]]) -> Vec<String> {
    let messages: Vec<Value> = payloads
        .iter()
        .map(|p| json!({"data": STANDARD.encode(p)}))
        .collect();
    let (status, body) = client.post(
        &format!("/v1/{TOPIC}:publish"),
        json!({ "messages": messages }),
    );
    assert_eq!(status, 200, "{body}");
    body["messageIds"]
        .as_array()
        .expect("messageIds")
        .iter()
        .map(|id| id.as_str().expect("messageId is a string").to_owned())
        .collect()
}

/// The `receivedMessages` of a pull answer (none if left out).
pub fn received(body: &Value) -> Vec<Value> {
    body.get("receivedMessages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

pub fn ack_id(m: &Value) -> String {
    m["ackId"].as_str().expect("ackId").to_owned()
}

/// The messageIds of received messages, in order.
pub fn message_ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            m["message"]["messageId"]
                .as_str()
                .expect("messageId")
                .to_owned()
        })
        .collect()
}
