//! Shared set-up of the integration tests: the real model.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod netns;

use std::path::PathBuf;

use sherpa_swarm::model_store::{fetch_model, known_model, DEFAULT_MODEL};

/// Path of SmolLM2-135M-Instruct Q4_1, fetched into the cache on first use.
/// Fails loudly when it cannot be had: these tests never skip.
pub fn smollm2() -> PathBuf {
    let model = known_model(DEFAULT_MODEL).expect("default model is known");
    match fetch_model(model, &Default::default(), &mut |_| {}) {
        Ok(path) => path,
        Err(e) => panic!(
            "the real test model could not be fetched ({e}). These tests need it: \
             run `cargo run --features cli -- fetch-model smollm2-135m` or set SHERPA_HOME to a cache that has it"
        ),
    }
}

/// The reference outputs written by `reference/gguf_reference.py`.
pub fn reference() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/reference/expected/smollm2-135m-q4_1.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Max |a - b| over |a|'s max.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// Kills a child process on drop, so a failing test leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion, requiring success (stderr shown if not),
/// and returns its output.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a `sherpa generate --ids` to completion, requiring success, and
/// returns the ids it printed and its whole stderr.
pub fn generated_ids(cmd: &mut std::process::Command) -> (String, String) {
    let stderr = String::from_utf8(run_ok(cmd).stderr).unwrap();
    let ids = stderr
        .lines()
        .find_map(|l| l.strip_prefix("ids: "))
        .unwrap_or_else(|| panic!("no ids in {stderr}"))
        .to_owned();
    (ids, stderr)
}

/// Runs a command to completion, requiring success (stderr shown if not),
/// and returns its stdout.
pub fn output_ok(cmd: &mut std::process::Command) -> Vec<u8> {
    run_ok(cmd).stdout
}

/// Spawns a long-running command and reads its stdout lines until `enough`
/// says so, stdout ends, or a minute passes; returns the guard and the lines.
pub fn spawn_reading(
    cmd: &mut std::process::Command,
    enough: impl Fn(&[String]) -> bool,
) -> (ChildGuard, Vec<String>) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let guard = ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut lines = Vec::new();
    while !enough(&lines) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    (guard, lines)
}

/// Spawns a long-running command and returns it with its first stdout line.
pub fn spawn_first_line(cmd: &mut std::process::Command) -> (ChildGuard, String) {
    let (guard, mut lines) = spawn_reading(cmd, |l| !l.is_empty());
    (guard, lines.pop().unwrap_or_default())
}

/// A fresh, empty `SHERPA_HOME` (no identities, no settings) that already
/// holds the real model, as after the first `sherpa fetch-model`: tests of
/// what a newcomer types start from it. The model is hard-linked (copied
/// across file systems), so no test downloads it twice.
pub fn fresh_home(name: &str) -> PathBuf {
    let model = smollm2();
    let home = std::env::temp_dir().join(format!("sherpa-home-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let models = home.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let file = model.file_name().unwrap();
    if std::fs::hard_link(&model, models.join(file)).is_err() {
        std::fs::copy(&model, models.join(file)).unwrap();
    }
    let stamp = model.with_extension("gguf.verified");
    std::fs::copy(&stamp, models.join(stamp.file_name().unwrap())).unwrap();
    home
}

/// Sends SIGINT (Ctrl-C) to a child and waits for it, requiring a clean exit.
pub fn interrupt(child: &mut ChildGuard) {
    let pid = child.0.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exits cleanly on Ctrl-C: {status}");
}

/// A bare libp2p peer for playing hostile peers, shared with the network
/// crate's own tests.
#[path = "../../swarm-dht/tests/common/mod.rs"]
mod raw;
#[allow(unused_imports)]
pub use raw::raw_peer;

/// One HTTP/1.1 request to `url` (`http://host:port/path`) on a fresh
/// connection: (status, body). Bodies are sent as JSON.
#[allow(dead_code)]
pub fn http(method: &str, url: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let path = path.split('#').next().unwrap_or("/").to_owned();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if body.is_some() {
        head += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        );
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(payload.as_bytes()).unwrap();
    // Some servers keep the connection open whatever the request says:
    // read by the answer's own framing.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed before the headers ended");
        raw.extend_from_slice(&buf[..n]);
    };
    let headers = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    let length = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    let chunked = headers.contains("transfer-encoding: chunked");
    let complete = |body: &[u8]| match (length, chunked) {
        (Some(n), _) => body.len() >= n,
        (None, true) => body.ends_with(b"0\r\n\r\n"),
        (None, false) => false,
    };
    while !complete(&raw[head_end..]) {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw[head_end..]).into_owned();
    let mut body = text.as_str();
    let mut whole = String::new();
    if chunked {
        while let Some((size, rest)) = body.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            whole += &rest[..size];
            body = &rest[size + 2..];
        }
    } else {
        whole = body.to_owned();
    }
    (status, whole)
}

/// Waits up to `limit` for `url`'s `/health` to answer 200.
#[allow(dead_code)]
pub fn wait_healthy(base: &str, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (status, body) = http("GET", &format!("{base}health"), None);
        if status == 200 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{base} is not healthy after {limit:?}: {status} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Waits up to `limit` for every server to run no session and, when
/// `free` is given, to have that many free cache tokens again.
#[allow(dead_code)]
pub fn wait_servers_idle(
    servers: &[sherpa_swarm::Server],
    free: Option<&[u64]>,
    limit: std::time::Duration,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let sessions: Vec<u32> = servers.iter().map(|s| s.current_info().sessions).collect();
        let now: Vec<u64> = servers
            .iter()
            .map(|s| s.current_info().cache_tokens_free)
            .collect();
        if sessions.iter().all(|&n| n == 0) && free.is_none_or(|f| f == now.as_slice()) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after {limit:?} the servers still run {sessions:?} sessions, free cache {now:?} (expected {free:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
