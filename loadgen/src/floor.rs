//! The kernel's floor: what one thread pays to `send` a 150-byte message to
//! each of N loopback TCP sockets that a reader watches with epoll, with no
//! server at all. Skywatch's fan-out does exactly one such send per client
//! per alert, so no implementation of it on this box can go below this
//! number of CPU microseconds per delivered message, nor deliver to N
//! clients faster than N times it on one core.

use crate::procfs::CpuWindow;
use crate::reader::{Conn, Progress, Reader, SendClock, wait_until};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// One thread's CPU time so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Sends `rounds` messages to each of `n` sockets; returns the sending
/// thread's CPU per send, in microseconds.
pub fn measure(n: usize, rounds: usize) -> io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut reader = Reader::new()?;
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let client = TcpStream::connect(addr)?;
        let (server_side, _) = listener.accept()?;
        server_side.set_nodelay(true)?;
        senders.push(server_side);
        reader.add(Conn {
            stream: client,
            pending: Vec::new(),
            measured: true,
        })?;
    }
    let clock = Arc::new(SendClock::new(rounds, 1));
    let progress = Arc::new(Progress::default());
    progress.busy.store(true, Ordering::Relaxed);
    let reading = std::thread::spawn({
        let (clock, progress) = (Arc::clone(&clock), Arc::clone(&progress));
        move || reader.run(clock, progress)
    });
    let mut window = CpuWindow::default();
    for k in 0..rounds {
        // The same bytes as an alert frame; the reader counts it by timestamp.
        let text = format!(
            r#"{{"message":"ALIEN_LANDING","timestamp":{},"regionCode":"LOCAL_REGION","sender":"floor","id":"00000000000000000000000000000000"}}"#,
            1 + k
        );
        let mut frame = vec![0x81, 126];
        frame.extend_from_slice(&(text.len() as u16).to_be_bytes());
        frame.extend_from_slice(text.as_bytes());
        clock.mark(k);
        let (cpu, wall) = (thread_cpu_ns(), Instant::now());
        for socket in &senders {
            // SAFETY: a plain send(2) on an open socket from a live buffer.
            unsafe {
                libc::send(
                    socket.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
        window.cpu_ns += thread_cpu_ns() - cpu;
        window.wall_ns += wall.elapsed().as_nanos() as u64;
        let expected = (n * (k + 1)) as u64;
        wait_until(Duration::from_secs(5), || {
            progress.alert_receipts.load(Ordering::Relaxed) >= expected
        });
    }
    progress.stop.store(true, Ordering::Release);
    let _ = reading.join();
    Ok(window.cpu_ns as f64 / 1000.0 / (n * rounds) as f64)
}
