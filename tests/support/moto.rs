//! An S3-compatible server for tests: moto (`pip install 'moto[server]'`), started on a free
//! loopback port and killed on drop. Shared by runtime/tests/storage_s3.rs and tests/ingest.rs
//! (included with `#[path]`). Without moto the caller skips, unless `TIDEPOOL_REQUIRE_MOTO` is
//! set.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The moto server process; killed and reaped on drop (also when an assertion fails).
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to run moto here: `moto_server`, else `python3 -m moto.server`; `None` if neither works.
fn moto_command() -> Option<Command> {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works("moto_server", &[]) {
        return Some(Command::new("moto_server"));
    }
    if works("python3", &["-m", "moto.server"]) {
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server"]);
        return Some(c);
    }
    None
}

/// moto answers anonymous GETs of private objects with 403 but does not check signatures.
const FAKE_AUTH: &str = "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/s3/aws4_request, \
                         SignedHeaders=host, Signature=00";

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Authorization: {FAKE_AUTH}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:.80}")))?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |i| i + 4);
    Ok((status, resp[split..].to_vec()))
}

pub fn start_moto(bucket: &str) -> Option<Moto> {
    let Some(mut cmd) = moto_command() else {
        // CI installs moto and sets this, so there a missing server is a failure, not a skip.
        assert!(
            std::env::var_os("TIDEPOOL_REQUIRE_MOTO").is_none(),
            "TIDEPOOL_REQUIRE_MOTO is set but moto is not installed"
        );
        eprintln!(
            "SKIPPED: moto is not installed (neither `moto_server` nor `python3 -m \
             moto.server` runs). Install with: pip install 'moto[server]'"
        );
        return None;
    };
    // A free port: bind, read, release. Another process could take it in between; then moto
    // fails to bind, exits, and the readiness poll below says so.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = cmd
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn moto");
    let mut moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = http(port, "GET", "/", b"") {
            break;
        }
        if let Ok(Some(status)) = moto.child.try_wait() {
            panic!("moto exited before becoming ready: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "moto not ready on port {port} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50)); // poll interval, not synchronisation
    }
    let (status, body) = http(moto.port, "PUT", &format!("/{bucket}"), b"").expect("create bucket");
    assert_eq!(
        status,
        200,
        "create bucket: {}",
        String::from_utf8_lossy(&body)
    );
    Some(moto)
}
