//! One HTTP/1.1 request over a Unix domain socket, for the one call Skywatch
//! makes on one: asking the Fly Machine API (`/.fly/api`) for this Machine's
//! OIDC token. ureq speaks TCP only, and a crate for a single local request
//! would weigh more than this module.
//!
//! The request says `Connection: close` and carries a `Content-Length`; the
//! response is read within a deadline and a size bound: the head through
//! httparse (already in the tree for the WebSocket handshake), then the body
//! as HTTP/1.1 frames it (RFC 9112 section 6.3): `Transfer-Encoding: chunked`,
//! `Content-Length`, or everything until the server closes. Anything else, or
//! anything ambiguous (both framings, two different lengths), is refused
//! rather than guessed at: a misread body here would be a misread token.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Most bytes of a response head (status line and headers), and of a chunked
/// body's trailers.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Most bytes of a chunk-size line (the size and any chunk extensions).
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// POSTs `body` to `path` on the HTTP server listening at `socket`, and
/// returns its answer, whatever the status. Fails when the whole exchange
/// takes longer than `timeout`, or the body would pass `max_body` bytes.
/// Errors name the socket and what went wrong, never the bodies.
pub fn post(
    socket: &Path,
    path: &str,
    content_type: &str,
    body: &[u8],
    timeout: Duration,
    max_body: usize,
) -> Result<Response, String> {
    // Both are ours, but a CR or LF would let one header become two.
    let header_safe = |s: &str| !s.is_empty() && !s.bytes().any(|b| b.is_ascii_control());
    if !path.starts_with('/') || path.contains(' ') || !header_safe(path) {
        return Err(format!("not a request path: {path:?}"));
    }
    if !header_safe(content_type) {
        return Err(format!("not a content type: {content_type:?}"));
    }
    let at = socket.display();
    let deadline = Instant::now() + timeout;
    let stream =
        UnixStream::connect(socket).map_err(|err| format!("cannot connect to {at}: {err}"))?;
    let mut stream = DeadlineStream { stream, deadline };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.flush())
        .map_err(|err| format!("cannot send the request to {at}: {}", describe(&err)))?;
    read_response(stream, max_body).map_err(|err| format!("bad answer from {at}: {err}"))
}

/// A socket whose every read and write must finish by one deadline: one
/// slow server cannot hold the caller longer than its timeout, however it
/// dribbles its bytes.
struct DeadlineStream {
    stream: UnixStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::from(io::ErrorKind::TimedOut))
        } else {
            Ok(left)
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.remaining()?))?;
        self.stream.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.remaining()?))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A socket timeout shows as WouldBlock (EAGAIN) on Linux: say what it means.
fn describe(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_string(),
        _ => err.to_string(),
    }
}

/// Reads one response from `reader`: the head, then the body as the head
/// frames it.
fn read_response(reader: impl Read, max_body: usize) -> Result<Response, String> {
    // Everything read, heads and chunk lines included, is bounded too: a
    // body's framing must not be able to cost many times the body.
    let mut input = Input::new(reader, 2 * max_body + 64 * 1024);
    let mut interim = 0;
    let head = loop {
        let head = input.head()?;
        match head.status {
            // Interim answers (100 Continue, 103 Early Hints) precede the
            // real one; a few at most.
            100 | 102..=199 => {
                interim += 1;
                if interim > MAX_INTERIM {
                    return Err(format!("more than {MAX_INTERIM} interim answers"));
                }
                continue;
            }
            101 => return Err("101 Switching Protocols to a plain request".into()),
            _ => break head,
        }
    };
    let body = match (&head.transfer_encoding, &head.content_length) {
        // A 204 or 304 never has a body, whatever its headers say.
        _ if head.status == 204 || head.status == 304 => Vec::new(),
        (Some(_), Some(_)) => {
            return Err("both Transfer-Encoding and Content-Length (ambiguous framing)".into());
        }
        (Some(coding), None) if coding.eq_ignore_ascii_case("chunked") => {
            input.chunked(max_body)?
        }
        (Some(coding), None) => return Err(format!("unsupported Transfer-Encoding {coding:?}")),
        (None, Some(length)) => {
            if *length > max_body as u64 {
                return Err(format!(
                    "the body is {length} bytes, more than the {max_body} allowed"
                ));
            }
            input.exactly(*length as usize)?
        }
        (None, None) => input.until_close(max_body)?,
    };
    Ok(Response {
        status: head.status,
        body,
    })
}

/// What the body's framing depends on, from a response head.
struct Head {
    status: u16,
    /// The Transfer-Encoding header's value(s), joined and trimmed.
    transfer_encoding: Option<String>,
    content_length: Option<u64>,
}

/// Most interim (1xx) answers taken before the real one.
const MAX_INTERIM: usize = 8;

/// Bytes read from the socket and not yet used, in front of the reader.
struct Input<R> {
    reader: R,
    buf: Vec<u8>,
    /// `buf[start..]` is unread.
    start: usize,
    /// Bytes read so far, and the most that may be.
    total: usize,
    limit: usize,
}

impl<R: Read> Input<R> {
    fn new(reader: R, limit: usize) -> Input<R> {
        Input {
            reader,
            buf: Vec::new(),
            start: 0,
            total: 0,
            limit,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads more into the buffer; false at the end of the stream.
    fn fill(&mut self) -> Result<bool, String> {
        // What was used is dropped first: the buffer holds only what is
        // unread, whatever the answer's length.
        self.buf.drain(..self.start);
        self.start = 0;
        let mut chunk = [0u8; 4096];
        loop {
            match self.reader.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.total += n;
                    if self.total > self.limit {
                        return Err(format!(
                            "the answer is longer than the {} bytes allowed",
                            self.limit
                        ));
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(describe(&err)),
            }
        }
    }

    fn head(&mut self) -> Result<Head, String> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            let parsed = response
                .parse(self.unread())
                .map_err(|err| format!("not an HTTP response ({err})"))?;
            if let httparse::Status::Complete(length) = parsed {
                if length > MAX_HEAD {
                    return Err(format!("the response head is over {MAX_HEAD} bytes"));
                }
                let head = Head::parse(&response)?;
                self.consume(length);
                return Ok(head);
            }
            if self.unread().len() > MAX_HEAD {
                return Err(format!("the response head is over {MAX_HEAD} bytes"));
            }
            if !self.fill()? {
                return Err(if self.unread().is_empty() {
                    "closed without answering".into()
                } else {
                    "closed in the middle of the response head".into()
                });
            }
        }
    }

    fn exactly(&mut self, length: usize) -> Result<Vec<u8>, String> {
        while self.unread().len() < length {
            if !self.fill()? {
                return Err(format!(
                    "closed after {} of {length} body bytes",
                    self.unread().len()
                ));
            }
        }
        let body = self.unread()[..length].to_vec();
        self.consume(length);
        Ok(body)
    }

    fn until_close(&mut self, max_body: usize) -> Result<Vec<u8>, String> {
        loop {
            if self.unread().len() > max_body {
                return Err(format!(
                    "the body is more than the {max_body} bytes allowed"
                ));
            }
            if !self.fill()? {
                break;
            }
        }
        let body = self.unread().to_vec();
        self.consume(body.len());
        Ok(body)
    }

    /// One line without its CRLF, of at most `limit` bytes.
    fn line(&mut self, limit: usize, what: &str) -> Result<Vec<u8>, String> {
        loop {
            if let Some(end) = self.unread().windows(2).position(|w| w == b"\r\n") {
                if end > limit {
                    break;
                }
                let line = self.unread()[..end].to_vec();
                self.consume(end + 2);
                return Ok(line);
            }
            if self.unread().len() > limit {
                break;
            }
            if !self.fill()? {
                return Err(format!("closed in the middle of {what}"));
            }
        }
        Err(format!("{what} is over {limit} bytes"))
    }

    /// A chunked body (RFC 9112 section 7.1): size lines in hex, each chunk
    /// followed by CRLF, a zero-size chunk, then trailer lines up to an empty
    /// one.
    fn chunked(&mut self, max_body: usize) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let line = self.line(MAX_CHUNK_LINE, "a chunk size line")?;
            let size = chunk_size(&line)?;
            if size == 0 {
                break;
            }
            if size > (max_body - body.len()) as u64 {
                return Err(format!(
                    "the body is more than the {max_body} bytes allowed"
                ));
            }
            body.extend(self.exactly(size as usize)?);
            if self.exactly(2)? != b"\r\n" {
                return Err("no CRLF after a chunk".into());
            }
        }
        let mut trailers = 0;
        loop {
            let line = self.line(MAX_HEAD, "the trailers")?;
            if line.is_empty() {
                return Ok(body);
            }
            trailers += line.len() + 2;
            if trailers > MAX_HEAD {
                return Err(format!("the trailers are over {MAX_HEAD} bytes"));
            }
        }
    }
}

/// The size on a chunk-size line, before any `;extension`.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(line).map_err(|_| "a chunk size line is not text")?;
    let hex = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim_end_matches([' ', '\t']);
    // At most 15 hex digits: no overflow, and far beyond any bound here.
    if hex.is_empty() || hex.len() > 15 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "bad chunk size {:?}",
            text.chars().take(40).collect::<String>()
        ));
    }
    u64::from_str_radix(hex, 16).map_err(|err| format!("bad chunk size: {err}"))
}

impl Head {
    fn parse(response: &httparse::Response) -> Result<Head, String> {
        let status = response.code.ok_or("no status code")?;
        let mut transfer_encoding: Vec<String> = Vec::new();
        let mut lengths: Vec<String> = Vec::new();
        for header in response.headers.iter() {
            let value = std::str::from_utf8(header.value)
                .map_err(|_| format!("the {} header is not text", header.name))?;
            // A header may be repeated, and one may hold a comma-separated list.
            let items = value.split(',').map(str::trim).filter(|v| !v.is_empty());
            if header.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding.extend(items.map(str::to_string));
            } else if header.name.eq_ignore_ascii_case("content-length") {
                lengths.extend(items.map(str::to_string));
            }
        }
        let content_length = match lengths.split_first() {
            None => None,
            Some((first, rest)) => {
                if rest.iter().any(|other| other != first) {
                    return Err(format!("conflicting Content-Length values {lengths:?}"));
                }
                // RFC 9110: 1*DIGIT, no sign, no spaces.
                if !first.bytes().all(|b| b.is_ascii_digit()) || first.len() > 15 {
                    return Err(format!("bad Content-Length {first:?}"));
                }
                Some(
                    first
                        .parse::<u64>()
                        .map_err(|err| format!("bad Content-Length: {err}"))?,
                )
            }
        };
        Ok(Head {
            status,
            transfer_encoding: (!transfer_encoding.is_empty())
                .then(|| transfer_encoding.join(", ")),
            content_length,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A reader that hands out one byte per read, so every parse crosses
    /// read boundaries everywhere.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((byte, rest)), Some(slot)) => {
                    *slot = *byte;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    /// Parses `raw` both at once and (when short: the head is re-parsed at
    /// every byte) byte by byte; both must agree.
    fn parse(raw: &str, max_body: usize) -> Result<Response, String> {
        let whole = read_response(raw.as_bytes(), max_body);
        if raw.len() > 2048 {
            return whole;
        }
        let trickled = read_response(Trickle(raw.as_bytes()), max_body);
        let shown: String = raw.chars().take(120).collect();
        assert_eq!(whole, trickled, "{shown:?}");
        whole
    }

    fn ok(status: u16, body: &str) -> Result<Response, String> {
        Ok(Response {
            status,
            body: body.as_bytes().to_vec(),
        })
    }

    #[test]
    fn content_length_frames_the_body() {
        let raw =
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello.world";
        assert_eq!(parse(raw, 64), ok(200, "hello.world"));
        // Bytes after the framed body are not part of it.
        let extra = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabEXTRA";
        assert_eq!(parse(extra, 64), ok(200, "ab"));
        // The same length repeated is one length.
        let repeated = "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\ncontent-length: 2\r\n\r\nab";
        assert_eq!(parse(repeated, 64), ok(200, "ab"));
        let empty = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse(empty, 64), ok(400, ""));
    }

    #[test]
    fn chunked_bodies_are_joined_with_extensions_and_trailers_dropped() {
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5;name=value\r\nhello\r\n1\r\n.\r\nA \r\n0123456789\r\n\
                   0\r\nX-Trailer: yes\r\n\r\n";
        assert_eq!(parse(raw, 64), ok(200, "hello.0123456789"));
        let upper = "HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n";
        assert_eq!(parse(upper, 64), ok(200, "ab"));
    }

    #[test]
    fn without_framing_the_body_runs_to_the_close() {
        let raw = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it\nuntil EOF";
        assert_eq!(parse(raw, 64), ok(200, "all of it\nuntil EOF"));
        // 204 and 304 have no body whatever follows.
        assert_eq!(parse("HTTP/1.1 204 No Content\r\n\r\n", 64), ok(204, ""));
    }

    #[test]
    fn interim_answers_are_skipped() {
        let raw = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n\
                   HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(parse(raw, 64), ok(200, "x"));
    }

    #[test]
    fn oversized_answers_are_refused_whatever_their_framing() {
        let long = "HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n";
        assert!(parse(long, 64).unwrap_err().contains("65 bytes"));
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n{}\r\n21\r\n{}\r\n0\r\n\r\n",
            "a".repeat(32),
            "b".repeat(33)
        );
        assert!(parse(&chunked, 64).unwrap_err().contains("64 bytes"));
        let huge_chunk = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\n";
        assert!(parse(huge_chunk, 64).unwrap_err().contains("64 bytes"));
        let to_close = format!("HTTP/1.1 200 OK\r\n\r\n{}", "c".repeat(65));
        assert!(parse(&to_close, 64).unwrap_err().contains("64 bytes"));
        let head = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "h".repeat(MAX_HEAD));
        assert!(parse(&head, 64).unwrap_err().contains("head is over"));
        let trailers = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{}",
            format!("X: {}\r\n", "t".repeat(1000)).repeat(20)
        );
        assert!(parse(&trailers, 64).unwrap_err().contains("trailers"));
        let size_line = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\n",
            "e".repeat(MAX_CHUNK_LINE + 1)
        );
        assert!(
            parse(&size_line, 64)
                .unwrap_err()
                .contains("chunk size line")
        );
    }

    #[test]
    fn framing_cannot_cost_many_times_the_body() {
        let interim = "HTTP/1.1 100 Continue\r\n\r\n".repeat(9) + "HTTP/1.1 200 OK\r\n\r\n";
        let err = read_response(interim.as_bytes(), 1024).expect_err("too many interim answers");
        assert!(err.contains("more than 8 interim"), "{err}");
        // One-byte chunks behind long extensions: small body, long answer.
        let chunk = format!("1;{}\r\nx\r\n", "e".repeat(1000));
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(200)
        );
        let err = read_response(chunked.as_bytes(), 1024).expect_err("too long an answer");
        assert!(err.contains("longer than"), "{err}");
    }

    #[test]
    fn garbage_and_truncation_are_errors_that_say_what() {
        let cases = [
            ("", "closed without answering"),
            ("SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP response"),
            ("HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP response"),
            (
                "HTTP/1.1 200 OK\r\nContent-Le",
                "middle of the response head",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
                "closed after 3 of 5",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
                "bad Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n",
                "bad Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                "conflicting",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                "ambiguous",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "unsupported",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "bad chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
                "bad chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
                "bad chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n",
                "CRLF",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
                "middle of",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
                "middle of",
            ),
            ("HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
        ];
        for (raw, expected) in cases {
            let err = parse(raw, 64).expect_err(raw);
            assert!(err.contains(expected), "{raw:?}: {err}");
        }
    }

    fn socket_path(label: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("skywatch-unix-http-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("api.sock")
    }

    #[test]
    fn sends_one_well_formed_request_and_reads_the_answer() {
        let path = socket_path("roundtrip");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("read");
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; 12];
            reader.read_exact(&mut body).expect("body");
            let mut stream = reader.into_inner();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\na.b.c")
                .expect("answer");
            (head, body)
        });
        let answer = post(
            &path,
            "/v1/tokens/oidc",
            "application/json",
            br#"{"aud":"x"} "#,
            Duration::from_secs(5),
            1024,
        );
        assert_eq!(answer, ok(200, "a.b.c"));
        let (head, body) = server.join().expect("server thread");
        assert_eq!(
            head,
            "POST /v1/tokens/oidc HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: 12\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(body, br#"{"aud":"x"} "#);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn a_silent_server_times_out_and_a_missing_one_is_named() {
        let path = socket_path("silent");
        let listener = UnixListener::bind(&path).expect("bind");
        let started = Instant::now();
        let err = post(
            &path,
            "/x",
            "text/plain",
            b"",
            Duration::from_millis(200),
            64,
        )
        .expect_err("no answer");
        assert!(err.contains("timed out"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(listener);
        let _ = std::fs::remove_file(&path);
        let err = post(&path, "/x", "text/plain", b"", Duration::from_secs(1), 64)
            .expect_err("no socket");
        assert!(
            err.contains("cannot connect to") && err.contains("api.sock"),
            "{err}"
        );
        let err = post(
            &path,
            "/x\r\nEvil: 1",
            "text/plain",
            b"",
            Duration::from_secs(1),
            64,
        )
        .expect_err("header injection");
        assert!(err.contains("not a request path"), "{err}");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
