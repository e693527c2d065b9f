//! Just enough of the client side of RFC 6455 for a load tool: the opening
//! handshake, parsing the server's frames, and masking our own.
//!
//! The tool parses frames itself rather than through tungstenite because one
//! thread reads thousands of sockets: a frame here is a slice of a shared
//! buffer, not an allocation, so the tool spends as little of the machine's
//! two cores as possible while the server is being measured.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

/// Bound for connecting and for the whole handshake of one client. A server
/// out of descriptors leaves connections unanswered in its listen queue, so
/// this is also how long finding a ceiling waits per failed client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a client could not join.
#[derive(Debug)]
pub enum JoinError {
    Connect(io::Error),
    /// The server answered with something other than 101 (e.g. 503 when full).
    Refused(String),
    Handshake(String),
}

impl JoinError {
    /// A short label, so that thousands of failures group into a few lines.
    pub fn kind(&self) -> String {
        match self {
            JoinError::Connect(err) => format!("connect: {err}"),
            JoinError::Refused(status) => format!("refused: {status}"),
            JoinError::Handshake(why) => format!("handshake: {why}"),
        }
    }
}

/// Opens a WebSocket to `addr` (path `/ws`). Returns the blocking stream and
/// any bytes that arrived after the 101 response (usually the greeting).
pub fn open(addr: SocketAddr) -> Result<(TcpStream, Vec<u8>), JoinError> {
    open_from(addr, None)
}

/// [`open`], from the local address `source` when given (port chosen by the
/// kernel): on loopback every 127.0.0.0/8 address is this machine's, so each
/// client can look like a different person on the internet.
pub fn open_from(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
) -> Result<(TcpStream, Vec<u8>), JoinError> {
    let mut stream = match (source, addr) {
        (Some(source), SocketAddr::V4(to)) => {
            connect_from(source, to, HANDSHAKE_TIMEOUT).map_err(JoinError::Connect)?
        }
        _ => TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT).map_err(JoinError::Connect)?,
    };
    let handshake_failed = |err: io::Error| JoinError::Handshake(err.to_string());
    stream.set_nodelay(true).map_err(handshake_failed)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(handshake_failed)?;
    let key = tungstenite::handshake::client::generate_key();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(handshake_failed)?;

    let mut response = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        let n = stream.read(&mut chunk).map_err(handshake_failed)?;
        if n == 0 {
            return Err(JoinError::Handshake("closed before the response".into()));
        }
        response.extend_from_slice(&chunk[..n]);
        if let Some(at) = find(&response, b"\r\n\r\n") {
            break at + 4;
        }
        if response.len() > 16 * 1024 {
            return Err(JoinError::Handshake("response head too long".into()));
        }
    };
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(JoinError::Refused(status.trim().to_string()));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let accepted = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == expected
        })
    });
    if !accepted {
        return Err(JoinError::Handshake("wrong Sec-WebSocket-Accept".into()));
    }
    stream.set_read_timeout(None).map_err(handshake_failed)?;
    Ok((stream, response.split_off(head_end)))
}

/// Connects a socket bound to `source` (any port) to `to`, within `timeout`:
/// `TcpStream` cannot bind before connecting, so this is done by hand.
fn connect_from(source: Ipv4Addr, to: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let sockaddr = |addr: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain syscalls; the descriptor is owned by `fd` from here on,
    // and every pointer passed is to a live local of the size given.
    unsafe {
        let raw = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let local = sockaddr(SocketAddrV4::new(source, 0));
        if libc::bind(raw, (&raw const local).cast(), len) < 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr(to);
        if libc::connect(raw, (&raw const remote).cast(), len) < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
            let mut poll = libc::pollfd {
                fd: raw,
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            match libc::poll(&mut poll, 1, ms) {
                0 => return Err(io::ErrorKind::TimedOut.into()),
                n if n < 0 => return Err(io::Error::last_os_error()),
                _ => {}
            }
            let mut error: libc::c_int = 0;
            let mut error_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut error).cast(),
                &mut error_len,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if error != 0 {
                return Err(io::Error::from_raw_os_error(error));
            }
        }
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}

/// A frame from the server, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Text(&'a [u8]),
    Ping(&'a [u8]),
    Close,
    /// Binary, pong or continuation: never sent by Skywatch, skipped.
    Other,
}

/// Parses the frame at the start of `buf`. Returns it with its length, or
/// `None` when the frame is not complete yet. Server frames are unmasked.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, &'static str> {
    let [first, second, rest @ ..] = buf else {
        return Ok(None);
    };
    if second & 0x80 != 0 {
        return Err("the server sent a masked frame");
    }
    let (length, header) = match second & 0x7f {
        126 => match rest {
            [a, b, ..] => (u16::from_be_bytes([*a, *b]) as u64, 4),
            _ => return Ok(None),
        },
        127 => match rest.get(..8) {
            Some(bytes) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                (u64::from_be_bytes(be), 10)
            }
            None => return Ok(None),
        },
        short => (short as u64, 2),
    };
    let Ok(length) = usize::try_from(length) else {
        return Err("frame length does not fit in memory");
    };
    let Some(payload) = buf.get(header..header + length) else {
        return Ok(None);
    };
    let frame = match first & 0x0f {
        0x1 => Frame::Text(payload),
        0x8 => Frame::Close,
        0x9 => Frame::Ping(payload),
        _ => Frame::Other,
    };
    Ok(Some((frame, header + length)))
}

pub const OP_TEXT: u8 = 0x1;
pub const OP_PONG: u8 = 0xA;

/// Encodes a client frame: FIN set, masked as RFC 6455 requires of clients.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mut mask = [0u8; 4];
    // A fixed mask would do for this server; a random one is what RFC 6455
    // asks of clients, and a failing entropy source is no reason to stop.
    let _ = getrandom::fill(&mut mask);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    out
}

/// Position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The unsigned integer that follows `"key":` in a flat JSON object.
pub fn json_u64(text: &[u8], key: &[u8]) -> Option<u64> {
    let mut pattern = Vec::with_capacity(key.len() + 3);
    pattern.push(b'"');
    pattern.extend_from_slice(key);
    pattern.extend_from_slice(b"\":");
    let start = find(text, &pattern)? + pattern.len();
    let digits = &text[start..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_short_and_medium_frames_and_waits_for_the_rest() {
        let mut buf = vec![0x81, 5];
        buf.extend_from_slice(b"hello");
        assert_eq!(parse(&buf), Ok(Some((Frame::Text(b"hello"), 7))));
        assert_eq!(parse(&buf[..6]), Ok(None));

        let mut long = vec![0x81, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(b'x', 256));
        assert_eq!(parse(&long).unwrap().unwrap().1, 260);
        assert_eq!(parse(&[0x89, 0]), Ok(Some((Frame::Ping(b""), 2))));
        assert_eq!(parse(&[0x88, 0]), Ok(Some((Frame::Close, 2))));
        assert!(parse(&[0x81, 0x81, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn client_frames_unmask_to_the_payload() {
        let frame = client_frame(OP_TEXT, b"abc");
        assert_eq!(frame[0], 0x81);
        assert_eq!(frame[1], 0x80 | 3);
        let mask = &frame[2..6];
        let unmasked: Vec<u8> = frame[6..]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect();
        assert_eq!(unmasked, b"abc");
    }

    #[test]
    fn connects_from_the_source_address_given() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(to) = listener.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address")
        };
        let source = Ipv4Addr::new(127, 0, 3, 7);
        let stream = connect_from(source, to, Duration::from_secs(3)).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), source);
        assert_eq!(stream.local_addr().unwrap().ip(), source);
        assert_eq!(stream.peer_addr().unwrap(), SocketAddr::V4(to));
        drop(listener);
        let refused = connect_from(source, to, Duration::from_secs(3));
        assert_eq!(
            refused.err().map(|e| e.kind()),
            Some(io::ErrorKind::ConnectionRefused)
        );
    }

    #[test]
    fn reads_integers_from_flat_json() {
        let text = br#"{"message":"ALIEN_LANDING","timestamp":1764280000123,"id":"x"}"#;
        assert_eq!(json_u64(text, b"timestamp"), Some(1764280000123));
        assert_eq!(json_u64(text, b"missing"), None);
    }
}
