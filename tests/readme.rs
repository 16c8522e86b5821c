//! The README's shell examples, run as a newcomer runs them: every line of
//! every ```sh block, in order, through `bash` with `sherpa` on the PATH,
//! in a fresh `SHERPA_HOME` (the model already fetched into it), with no
//! flag added. Only the addresses that daemons print are put in for the
//! README's `/p2p/12D3...` placeholders. `tracker` and `serve` lines are
//! daemons: the next line starts as soon as they print their address,
//! as a person or a script would. Each command's result is checked, and
//! the command-line synopsis is checked against `--help`, so the README
//! cannot drift from the program.
//!
//! `cargo run --release --features F -- ARGS` lines run the `sherpa ARGS`
//! this test was built with; the `cargo test` line must be the one
//! `.ci/run` runs.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ChildGuard;

const README: &str = include_str!("../README.md");
const CI: &str = include_str!("../.ci/run");

/// The lines of each ```sh block, with the heading they stand under.
fn sh_blocks() -> Vec<(String, Vec<String>)> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut current: Option<Vec<String>> = None;
    for line in README.lines() {
        match &mut current {
            Some(lines) if line.trim_start().starts_with("```") => {
                blocks.push((heading.clone(), std::mem::take(lines)));
                current = None;
            }
            Some(lines) if !line.trim().is_empty() => lines.push(line.to_owned()),
            Some(_) => {}
            None if line.trim() == "```sh" => current = Some(Vec::new()),
            None if line.starts_with('#') => heading = line.trim_start_matches('#').trim().into(),
            None => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```sh block in the README");
    blocks
}

/// A line without its trailing comment.
fn without_comment(line: &str) -> &str {
    match line.find("  #") {
        Some(i) => line[..i].trim_end(),
        None => line.trim_end(),
    }
}

/// What a README line asks for.
enum Line {
    /// The test command: checked against `.ci/run`.
    TestCommand,
    /// A `sherpa` command line, as bash should run it.
    Sherpa(String),
}

fn classify(line: &str) -> Line {
    let bare = without_comment(line);
    if bare.starts_with("cargo test ") {
        return Line::TestCommand;
    }
    if let Some(rest) = bare.strip_prefix("cargo run --release --features ") {
        let (_features, args) = rest
            .split_once(" -- ")
            .unwrap_or_else(|| panic!("README line {line:?}: expected `-- ARGS`"));
        return Line::Sherpa(format!("sherpa {args}"));
    }
    if bare.starts_with("sherpa ") {
        return Line::Sherpa(bare.to_owned());
    }
    panic!(
        "README line {line:?} is not a command this test knows how to run; teach tests/readme.rs"
    );
}

/// The `sherpa` subcommand of a command line.
fn subcommand(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or("")
}

/// A running `tracker` or `serve` and the address it printed.
struct Daemon {
    subcommand: String,
    addr: String,
    child: ChildGuard,
}

struct Session {
    home: PathBuf,
    bin: PathBuf,
    daemons: Vec<Daemon>,
}

impl Session {
    fn new(name: &str) -> Self {
        let bin = Path::new(env!("CARGO_BIN_EXE_sherpa"))
            .parent()
            .unwrap()
            .to_owned();
        Self {
            home: common::fresh_home(name),
            bin,
            daemons: Vec::new(),
        }
    }

    fn bash(&self, line: &str) -> Command {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bin.clone()];
        paths.extend(std::env::split_paths(&path));
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(line)
            .env("PATH", std::env::join_paths(paths).unwrap())
            .env("SHERPA_HOME", &self.home)
            .stdin(Stdio::null());
        cmd
    }

    /// `line` with each `.../p2p/12D3...` placeholder replaced by the
    /// address a daemon printed with the same beginning.
    fn substitute(&self, line: &str) -> String {
        let mut out = Vec::new();
        for word in line.split(' ') {
            let Some((prefix, _)) = word.split_once("/p2p/12D3...") else {
                out.push(word.to_owned());
                continue;
            };
            let addr = self
                .daemons
                .iter()
                .rev()
                .find(|d| d.addr.starts_with(&format!("{prefix}/p2p/")))
                .unwrap_or_else(|| panic!("no daemon printed an address like {word:?}"));
            out.push(addr.addr.clone());
        }
        out.join(" ")
    }

    /// Starts a daemon and waits for the address it prints first.
    fn spawn(&mut self, line: &str) {
        let log = self.home.join(format!("daemon-{}.log", self.daemons.len()));
        let mut child = self
            .bash(&format!("exec {line}"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let child = ChildGuard(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(180))
            .unwrap_or_else(|_| {
                panic!(
                    "{line:?} printed no address; its stderr:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        assert!(
            addr.contains("/p2p/12D3") || addr.starts_with("http://127.0.0.1:"),
            "{line:?} printed {addr:?}"
        );
        self.daemons.push(Daemon {
            subcommand: subcommand(line).to_owned(),
            addr,
            child,
        });
    }

    /// Runs a command to completion, requiring success. The limit only
    /// catches a hang: `sherpa bench` takes about a minute in a debug build
    /// on 2 idle cores, several on a busy machine.
    fn run(&self, line: &str) -> (String, String) {
        let out_path = self.home.join("out");
        let err_path = self.home.join("err");
        let mut child = ChildGuard(
            self.bash(line)
                .stdout(std::fs::File::create(&out_path).unwrap())
                .stderr(std::fs::File::create(&err_path).unwrap())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20 * 60);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{line:?} ran over 20 minutes");
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap();
        let stderr = std::fs::read_to_string(&err_path).unwrap();
        assert!(
            status.success(),
            "{line:?} failed ({status}):\n{stderr}\nstdout:\n{stdout}"
        );
        (stdout, stderr)
    }

    fn servers(&self) -> usize {
        self.daemons
            .iter()
            .filter(|d| d.subcommand == "serve")
            .count()
    }

    /// Stops every daemon with Ctrl-C, as their user would.
    fn stop(&mut self) {
        for mut daemon in self.daemons.drain(..).rev() {
            common::interrupt(&mut daemon.child);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.daemons.clear();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

#[test]
fn every_shell_example_in_the_readme_works_as_written() {
    let blocks = sh_blocks();
    assert!(
        blocks.len() >= 3,
        "the README's ```sh blocks were not found"
    );
    let mut ran = Vec::new();
    for (i, (heading, lines)) in blocks.iter().enumerate() {
        let mut session = Session::new(&format!("readme{i}"));
        for line in lines {
            let command = match classify(line) {
                Line::TestCommand => {
                    let bare = without_comment(line);
                    assert!(
                        CI.lines().any(|l| l.trim() == bare),
                        "the README's test command {bare:?} is not what .ci/run runs"
                    );
                    continue;
                }
                Line::Sherpa(command) => session.substitute(&command),
            };
            let started = Instant::now();
            match subcommand(&command) {
                "tracker" | "serve" => session.spawn(&command),
                "dashboard" => {
                    session.spawn(&command);
                    check_dashboard(&session.daemons.last().unwrap().addr);
                }
                "demo" if command.contains("--dashboard") => {
                    session.spawn(&command);
                    check_dashboard(&session.daemons.last().unwrap().addr);
                }
                "nodes" => {
                    let (stdout, _) = session.run(&command);
                    let expected = format!("{} servers of smollm2-135m", session.servers());
                    assert!(stdout.contains(&expected), "{command:?}:\n{stdout}");
                    assert!(!stdout.contains("have no host"), "{command:?}:\n{stdout}");
                }
                "generate" | "demo" => {
                    let (stdout, stderr) = session.run(&command);
                    assert!(
                        stdout.split_whitespace().count() >= 3,
                        "{command:?} answered {stdout:?}:\n{stderr}"
                    );
                    assert!(stderr.contains("route:"), "{command:?}:\n{stderr}");
                    assert!(stderr.contains("tokens/s"), "{command:?}:\n{stderr}");
                }
                "bench" => {
                    let (stdout, _) = session.run(&command);
                    assert!(stdout.contains("decode"), "{command:?}:\n{stdout}");
                }
                other => panic!("README runs `sherpa {other}`, which this test does not check yet"),
            }
            eprintln!(
                "[{heading}] {command}  ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            ran.push(command);
        }
        // Every node got an identity of its own.
        let mut peers: Vec<&str> = session
            .daemons
            .iter()
            .map(|d| d.addr.rsplit("/p2p/").next().unwrap())
            .collect();
        let started = peers.len();
        peers.sort_unstable();
        peers.dedup();
        assert_eq!(peers.len(), started, "two daemons share an identity");
        session.stop();
    }
    for must in [
        "sherpa demo",
        "sherpa tracker",
        "sherpa serve",
        "sherpa nodes",
        "sherpa dashboard",
        "sherpa demo --dashboard",
    ] {
        assert!(
            ran.iter().any(|c| c.starts_with(must)),
            "the README no longer runs {must}: {ran:?}"
        );
    }
}

/// A dashboard a README line started becomes healthy and chats.
fn check_dashboard(url: &str) {
    common::wait_healthy(url, Duration::from_secs(180));
    let (status, body) = common::http(
        "POST",
        &format!("{url}v1/chat/completions"),
        Some(&serde_json::json!({
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        })),
    );
    assert_eq!(status, 200, "{url}: {body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{url} answered {body}");
}

/// Every flag of the README's command-line synopsis exists.
#[test]
fn the_readme_synopsis_matches_the_help() {
    let synopsis = README
        .split("## The command line")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("the README's command-line synopsis");
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    for line in synopsis.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"sherpa") {
            commands.push((words[1].to_owned(), Vec::new()));
        }
        let Some((_, flags)) = commands.last_mut() else {
            continue;
        };
        for word in words {
            let flag = word.trim_start_matches(['[', '(']);
            if let Some(name) = flag.strip_prefix("--") {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                flags.push(format!("--{name}"));
            }
        }
    }
    assert!(commands.len() >= 8, "{commands:?}");
    for (command, flags) in commands {
        let help = common::output_ok(
            Command::new(env!("CARGO_BIN_EXE_sherpa")).args([command.as_str(), "--help"]),
        );
        let help = String::from_utf8(help).unwrap();
        for flag in flags {
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "the README gives `sherpa {command} {flag}`, which `sherpa {command} --help` does not know:\n{help}"
            );
        }
    }
}
