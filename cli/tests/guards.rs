//! What the command does to keep the admin token and the node's config where they belong:
//! the token goes only to a process that proves it holds the node key, and `node run` warns
//! of a config that exposes the node.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::estuary;
use estuary_node::config::Config;

/// How long a process in this test may take to start or answer.
const PATIENCE: Duration = Duration::from_secs(60);
/// Largest request the fake server keeps, in bytes.
const REQUEST_BYTES_MAX: usize = 64 * 1024;

/// `estuary init` of a node in `dir/node` with its API on `api`; the config's path.
fn init(dir: &Path, api: &str) -> std::path::PathBuf {
    let authority = "ab".repeat(32);
    let output = estuary(
        dir,
        &[
            "init",
            "--data-dir",
            "node",
            "--authority-key",
            &authority,
            "--api-listen",
            api,
            "--json",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir.join("node").join("estuary.toml")
}

/// A process on `listener` that answers every request as a node's `/health` would, with a
/// signature no node key made, and keeps every byte it was sent.
fn impostor(listener: TcpListener) -> Arc<Mutex<Vec<u8>>> {
    let received = Arc::new(Mutex::new(Vec::new()));
    let kept = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < REQUEST_BYTES_MAX
            {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            kept.lock().unwrap().extend_from_slice(&request);
            let body = format!(
                r#"{{"status":"ok","institution":"xinhua","roster_version":1,"challenge":{{"key":"{}","signature":"{}"}}}}"#,
                "00".repeat(32),
                "00".repeat(64)
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    received
}

#[test]
fn the_admin_token_is_never_sent_to_a_process_that_cannot_sign_the_challenge() {
    let dir = tempfile::tempdir().unwrap();
    // The node is down and another process holds its API port.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = listener.local_addr().unwrap().to_string();
    let config_path = init(dir.path(), &api);
    let token = Config::load(&config_path).unwrap().api.admin_token;
    let received = impostor(listener);

    let config = config_path.to_str().unwrap();
    for command in [&["status"][..], &["audit", "--verify"], &["verify"]] {
        let output = estuary(dir.path(), &[&["--config", config], command].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{command:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "the process answering on {api} is not this node (its key does not sign the challenge); the token was not sent"
            )),
            "{command:?}: {stderr}"
        );
    }
    let received = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert_eq!(
        received.matches("GET /health?challenge=").count(),
        3,
        "one challenge per command: {received}"
    );
    assert!(!received.contains(&token), "the token reached the impostor");
    assert!(
        !received.to_lowercase().contains("authorization"),
        "{received}"
    );
}

#[test]
fn node_run_warns_of_an_api_off_loopback_and_a_config_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_path = init(dir.path(), &format!("0.0.0.0:{port}"));
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    // No roster is in place, so the node stops at its first start, after the warnings.
    let log = dir.path().join("node.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_estuary"))
        .current_dir(dir.path())
        .args(["--config", config_path.to_str().unwrap(), "node", "run"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains(&format!(
            "api.listen is 0.0.0.0:{port}, not a loopback address"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("is readable by other users (mode 644)"),
        "{stderr}"
    );
    assert!(stderr.contains("WARN"), "{stderr}");
}
