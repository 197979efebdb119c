//! Test harness: a real `ferrite server` process on an ephemeral port, stopped by PID.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Server {
    pub child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut s = Server::start_in(&data_dir, "127.0.0.1:0", extra);
        s._tmp = Some(tmp);
        s
    }

    pub fn start_in(data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrite"));
        cmd.arg("server")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir);
        for e in extra {
            cmd.arg("--set").arg(e);
        }
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn ferrite server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("ferrite server did not print its ready line within {STARTUP_TIMEOUT:?}")
            });
            if let Some(rest) = line.strip_prefix("ferrite ready: listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        Server {
            child: Some(child),
            addr,
            data_dir: data_dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: None,
        }
    }

    /// A handle on a server started elsewhere (not stopped by this handle).
    pub fn at(addr: &str) -> Server {
        Server {
            child: None,
            addr: addr.to_string(),
            data_dir: PathBuf::new(),
            extra: vec![],
            _tmp: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL by PID: no flush, no clean-shutdown marker.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM by PID and wait (bounded) for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(status.success(), "server exited with {status}");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("server did not stop within 20 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts again on the same data directory and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old socket may linger briefly; the new process retries through us.
        loop {
            let s =
                std::panic::catch_unwind(|| Server::start_in(&self.data_dir, &self.addr, &extra));
            match s {
                Ok(mut s) => {
                    self.child = s.child.take();
                    return;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.addr).set("log_level", "3");
        c
    }

    pub fn admin(&self) -> AdminClient<DefaultClientContext> {
        self.config().create().unwrap()
    }

    pub async fn create_topic(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) {
        let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in configs {
            t = t.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(OP_TIMEOUT));
        for r in self.admin().create_topics([&t], &opts).await.unwrap() {
            r.unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

use ferrite_protocol::kafka_protocol;

/// One request frame: length prefix, header (client id "raw"), body.
pub fn encode_request<Req: kafka_protocol::protocol::Encodable>(
    key: kafka_protocol::messages::ApiKey,
    version: i16,
    correlation_id: i32,
    body: &Req,
) -> bytes::BytesMut {
    use bytes::{BufMut, BytesMut};
    use kafka_protocol::messages::RequestHeader;
    use kafka_protocol::protocol::{Encodable, StrBytes};
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("raw")))
        .encode(&mut buf, key.request_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf
}

/// Reads one response frame (without its length prefix).
pub fn read_frame(s: &mut std::net::TcpStream) -> bytes::Bytes {
    use std::io::Read;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut frame = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut frame).unwrap();
    bytes::Bytes::from(frame)
}

/// Sends one request over a raw socket and decodes the response, for inputs that real
/// clients refuse to send.
pub fn raw<Req: kafka_protocol::protocol::Encodable, Resp: kafka_protocol::protocol::Decodable>(
    addr: &str,
    key: kafka_protocol::messages::ApiKey,
    version: i16,
    body: &Req,
) -> Resp {
    use bytes::Buf;
    use kafka_protocol::messages::ResponseHeader;
    use kafka_protocol::protocol::Decodable;
    use std::io::Write;
    let buf = encode_request(key, version, 7, body);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&buf).unwrap();
    let mut resp = read_frame(&mut s);
    let header = ResponseHeader::decode(&mut resp, key.response_header_version(version)).unwrap();
    assert_eq!(header.correlation_id, 7);
    let out = Resp::decode(&mut resp, version).unwrap();
    assert_eq!(resp.remaining(), 0);
    out
}

/// A `/proc/<pid>/status` memory figure (`VmRSS`, `VmHWM`, ...) in bytes.
pub fn proc_status_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
    kib * 1024
}
