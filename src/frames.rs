//! WebSocket frames as the server sends them: encoded once into bytes, then
//! written as they are to every client that gets them (`fanout.rs`).
//!
//! Server frames are never masked (RFC 6455, section 5.1), so the same bytes
//! are right for every client: an alert is framed once, whatever the number
//! of clients.

use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

/// A complete text frame carrying `text`.
pub fn text_frame(text: String) -> Vec<u8> {
    encode(Frame::message(text, OpCode::Data(Data::Text), true))
}

/// A close frame with `code` and a short human `reason`.
pub fn close_frame(code: CloseCode, reason: &'static str) -> Vec<u8> {
    encode(Frame::close(Some(CloseFrame {
        code,
        reason: reason.into(),
    })))
}

/// An empty ping, which every live client answers with a pong.
pub fn ping() -> Vec<u8> {
    encode(Frame::ping(Vec::new()))
}

/// One frame (unmasked) as bytes ready for the socket.
fn encode(frame: Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len());
    frame
        .format(&mut out)
        .expect("writing to a Vec cannot fail");
    out
}
