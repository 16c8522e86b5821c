//! The dashboard's page in headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed with apt on first use), driven through
//! WebDriver the way a person uses it, against a loopback swarm of twelve
//! real servers (four replicas of each third of the model): choose
//! "10 PCs Near Me (WAN)", give the tracker, see the node selector with
//! the servers ranked and ten checked, uncheck servers and see the
//! selection and the coverage follow, open a node's details, and chat:
//! the streamed answer equals `sherpa generate`'s for the same greedy
//! request; Retry asks again, Stop ends a long answer and the servers
//! drop its session. Elements are found by their labels and roles, keys
//! work (Escape closes the selector).
//!
//! Screenshots of every step go to `target/dashboard-screenshots/`.

#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ChildGuard;
use serde_json::{json, Value};
use sherpa_swarm::dashboard::{Dashboard, DashboardConfig};
use sherpa_swarm::{BlockRange, LocalSwarm, ModelId};

const PROMPT: &str = "Give me one tip for learning to paint.";
const TOKENS: &str = "24";

/// Installs Chromium and its WebDriver with apt when they are missing.
fn chromedriver() -> PathBuf {
    let driver = PathBuf::from("/usr/bin/chromedriver");
    if driver.exists() && Path::new("/usr/bin/chromium").exists() {
        return driver;
    }
    let apt = |args: &[&str]| {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "this test drives Chromium: install it with `apt-get install chromium chromium-driver` \
             (apt-get {args:?} failed)"
        );
    };
    apt(&["update", "-qq"]);
    apt(&[
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "chromium",
        "chromium-driver",
    ]);
    driver
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A WebDriver session.
struct Browser {
    base: String,
    _driver: ChildGuard,
    shots: PathBuf,
}

impl Browser {
    /// A desktop window of `width` x `height`, or with `phone`, Chrome's
    /// emulation of a phone screen that size (a headless window cannot be
    /// made narrower than about 500 px).
    fn start(width: u32, height: u32, phone: bool) -> Self {
        let port = free_port();
        let driver = ChildGuard(
            Command::new(chromedriver())
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let url = format!("http://127.0.0.1:{port}/");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut options = json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", format!("--window-size={width},{height}")],
        });
        if phone {
            options["mobileEmulation"] = json!({"deviceMetrics": {
                "width": width, "height": height, "pixelRatio": 1, "touch": true,
            }});
        }
        let (status, body) = common::http(
            "POST",
            &format!("{url}session"),
            Some(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": options,
            }}})),
        );
        assert_eq!(status, 200, "new WebDriver session: {body}");
        let session: Value = serde_json::from_str(&body).unwrap();
        let id = session["value"]["sessionId"].as_str().unwrap();
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Self {
            base: format!("{url}session/{id}/"),
            _driver: driver,
            shots,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, text) = common::http(method, &format!("{}{path}", self.base), body.as_ref());
        assert_eq!(status, 200, "WebDriver {method} {path}: {text}");
        serde_json::from_str::<Value>(&text).unwrap()["value"].take()
    }

    fn goto(&self, url: &str) {
        self.call("POST", "url", Some(json!({"url": url})));
    }

    /// Elements matching an XPath.
    fn all(&self, xpath: &str) -> Vec<String> {
        let found = self.call(
            "POST",
            "elements",
            Some(json!({"using": "xpath", "value": xpath})),
        );
        found
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                // {"element-6066-11e4-a52f-4a6f2eb79ab0": id}
                let id = e.as_object().and_then(|o| o.values().next());
                id.and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("not an element: {e}"))
                    .to_owned()
            })
            .collect()
    }

    /// Waits up to 60 s for `xpath` to match a displayed element.
    fn find(&self, xpath: &str) -> String {
        self.wait(&format!("{xpath} to be shown"), || {
            self.all(xpath).into_iter().find(|e| self.displayed(e))
        })
    }

    fn wait<T>(&self, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(found) = probe() {
                return found;
            }
            if Instant::now() > deadline {
                self.shot("timeout");
                let note =
                    self.script("return document.getElementById('selection-note').textContent");
                panic!("waited 60 s for {what} (the page's note: {note})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn displayed(&self, element: &str) -> bool {
        self.call("GET", &format!("element/{element}/displayed"), None) == json!(true)
    }

    fn click(&self, element: &str) {
        self.call("POST", &format!("element/{element}/click"), Some(json!({})));
    }

    fn type_text(&self, element: &str, text: &str) {
        self.call(
            "POST",
            &format!("element/{element}/value"),
            Some(json!({"text": text})),
        );
    }

    fn clear(&self, element: &str) {
        self.call("POST", &format!("element/{element}/clear"), Some(json!({})));
    }

    fn text(&self, element: &str) -> String {
        self.call("GET", &format!("element/{element}/text"), None)
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Presses a key (a WebDriver key code such as `\u{E00C}`, Escape).
    fn press(&self, key: &str) {
        self.call(
            "POST",
            "actions",
            Some(
                json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
                    {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key},
                ]}]}),
            ),
        );
    }

    fn checked(&self, element: &str) -> bool {
        self.call("GET", &format!("element/{element}/selected"), None) == json!(true)
    }

    fn script(&self, script: &str) -> Value {
        self.call(
            "POST",
            "execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn shot(&self, name: &str) {
        let png = self.call("GET", "screenshot", None);
        let bytes = base64_decode(png.as_str().unwrap());
        std::fs::write(self.shots.join(format!("{name}.png")), bytes).unwrap();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = text.bytes().filter(|&c| c != b'=' && c != b'\n').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// The checkboxes of the node selector, as (label, element).
fn use_boxes(browser: &Browser) -> Vec<(String, String)> {
    let boxes = browser.all("//dialog//input[@type='checkbox'][starts-with(@aria-label, 'Use ')]");
    boxes
        .into_iter()
        .map(|e| {
            let label = browser
                .call("GET", &format!("element/{e}/attribute/aria-label"), None)
                .as_str()
                .unwrap()
                .to_owned();
            (label, e)
        })
        .collect()
}

fn coverage_status(browser: &Browser) -> String {
    browser.text(&browser.find("//dialog//*[@role='status'][@id='coverage-status']"))
}

#[test]
fn a_person_chooses_wan_checks_nodes_and_chats_in_the_browser() {
    let model = common::smollm2();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Four replicas of each third: twelve servers, ten of which the
    // auto-selection checks.
    let spans: Vec<BlockRange> = (0..12)
        .map(|i| BlockRange::new(10 * (i % 3), 10 * (i % 3) + 10).unwrap())
        .collect();
    let swarm = runtime
        .block_on(LocalSwarm::start_spans(
            &model.to_string_lossy(),
            ModelId::new("smollm2-135m").unwrap(),
            &spans,
        ))
        .unwrap();
    let tracker = swarm.tracker.addr().to_string();
    let home = common::fresh_home("browser");
    let reference = String::from_utf8(common::output_ok(
        Command::new(env!("CARGO_BIN_EXE_sherpa"))
            .env("SHERPA_HOME", &home)
            .args(["generate", "--tracker", &tracker, "--prompt", PROMPT])
            .args(["--max-new-tokens", TOKENS]),
    ))
    .unwrap();

    let dashboard = runtime
        .block_on(Dashboard::start(
            DashboardConfig::default()
                .with_listen("127.0.0.1:0".parse().unwrap())
                .with_model(model.to_string_lossy().into_owned())
                .with_state_file(home.join("dashboard.json")),
        ))
        .unwrap();
    let browser = Browser::start(1280, 900, false);
    browser.goto(&dashboard.url());
    browser.find("//*[@role='radiogroup'][.//legend[normalize-space()='Swarm Mode']]");
    browser.shot("01-start");

    // Choose WAN, give the tracker, connect.
    let wan = browser
        .find("//input[@type='radio'][@id=//label[normalize-space()='10 PCs Near Me (WAN)']/@for]");
    browser.click(&wan);
    let field = browser.find("//input[@id=//label[normalize-space()='Tracker address']/@for]");
    browser.clear(&field);
    browser.type_text(&field, &tracker);
    browser.click(&browser.find("//button[normalize-space()='Connect']"));

    // The node selector: twelve servers ranked, ten checked, covering all.
    browser.find("//dialog[@open][.//h2[normalize-space()='Node selector']]");
    let boxes = browser.wait("the twelve servers in the node selector", || {
        let boxes = use_boxes(&browser);
        (boxes.len() == 12).then_some(boxes)
    });
    let checked: Vec<&String> = boxes
        .iter()
        .filter(|(_, e)| browser.checked(e))
        .map(|(l, _)| l)
        .collect();
    assert_eq!(checked.len(), 10, "ten checked: {checked:?}");
    browser.wait("the coverage line", || {
        coverage_status(&browser)
            .contains("all 30 blocks")
            .then_some(())
    });
    browser.shot("02-node-selector");
    let api = |path: &str| -> Value {
        let (status, body) = common::http("GET", &format!("{}{path}", dashboard.url()), None);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    };
    let nodes = api("api/nodes");
    let ranked: Vec<String> = nodes["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("Use {}", s["name"].as_str().unwrap()))
        .collect();
    let shown: Vec<String> = boxes.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(shown, ranked, "the rows are in rank order");

    // Uncheck every server of blocks 20..30: the line names the gap at
    // once, and the choice reaches the dashboard.
    let last_third: Vec<String> = nodes["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["blocks"]["start"] == 20)
        .map(|s| format!("Use {}", s["name"].as_str().unwrap()))
        .collect();
    assert_eq!(last_third.len(), 4);
    // A server left unchecked is still the swarm's to choose: once the
    // others are unchecked, it takes their place and the page says so; the
    // person unchecks it too.
    browser.wait("every host of blocks 20..30 to be unchecked", || {
        for label in &last_third {
            let (_, element) = use_boxes(&browser)
                .into_iter()
                .find(|(l, _)| l == label)
                .unwrap();
            if browser.checked(&element) {
                browser.click(&element);
            }
        }
        let status = coverage_status(&browser);
        let nodes = api("api/nodes");
        (status.contains("Blocks 20..30")
            && nodes["excluded"].as_array().unwrap().len() == 4
            && nodes["coverage"]["covered"] == false)
            .then_some(())
    });
    let cells = browser.all("//dialog//*[@id='modal-coverage-bar']/*");
    assert_eq!(cells.len(), 30, "one cell per block");
    browser.shot("03-unchecked");

    // A node's details.
    let first = nodes["servers"][0]["name"].as_str().unwrap().to_owned();
    browser.click(&browser.find(&format!("//button[@aria-label='Details for {first}']")));
    let headline = browser.text(&browser.find("//*[@id='details-headline']"));
    assert!(
        headline.starts_with(&format!("{first} - ")) && headline.contains("Ping"),
        "details headline: {headline:?}"
    );
    browser.shot("04-details");

    // Back to the automatic choice; close the selector.
    browser.click(&browser.find("//button[normalize-space()='Reset to automatic']"));
    browser.wait("the selection to cover again", || {
        coverage_status(&browser)
            .contains("all 30 blocks")
            .then_some(())
    });
    // Pinning a server the swarm did not choose checks it, and the
    // dashboard keeps the pin.
    let spare = browser.wait("a server left unchecked", || {
        use_boxes(&browser)
            .into_iter()
            .find(|(_, e)| !browser.checked(e))
    });
    let spare_name = spare.0.trim_start_matches("Use ").to_owned();
    let pin = browser.find(&format!("//button[@aria-label='Pin {spare_name}']"));
    browser.click(&pin);
    browser.wait("the pinned server to be checked and kept", || {
        let pressed = browser.call(
            "GET",
            &format!("element/{pin}/attribute/aria-pressed"),
            None,
        );
        let kept = api("api/nodes")["servers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| {
                s["name"] == spare_name.as_str() && s["pinned"] == true && s["selected"] == true
            });
        (pressed == json!("true") && browser.checked(&spare.1) && kept).then_some(())
    });
    browser.shot("05-pinned");
    browser.click(&browser.find("//button[normalize-space()='Reset to automatic']"));
    browser.wait("no pins", || {
        api("api/nodes")["pinned"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });

    // Escape closes the selector, and focus goes back where it was.
    browser.press("\u{E00C}");
    browser.wait("the selector to close", || {
        browser.all("//dialog[@open]").is_empty().then_some(())
    });
    let focused = browser.script("return document.activeElement && document.activeElement.id");
    assert!(
        matches!(
            focused.as_str(),
            Some("connect" | "mode-wan" | "open-selector")
        ),
        "focus after closing the selector: {focused}"
    );

    // Chat, with the settings a greedy `sherpa generate` uses.
    browser.click(&browser.find("//summary[normalize-space()='Settings']"));
    let max_tokens = browser.find("//input[@id=//label[normalize-space()='Max tokens']/@for]");
    browser.clear(&max_tokens);
    browser.type_text(&max_tokens, TOKENS);
    let prompt = browser.find("//textarea[@id=//label[normalize-space()='Prompt']/@for]");
    browser.type_text(&prompt, PROMPT);
    // Where the controls are: streaming must not move them.
    let layout = "return ['prompt', 'send', 'pipeline', 'metrics'].map((id) => \
                  Math.round(document.getElementById(id).getBoundingClientRect().top + window.scrollY))";
    let before = browser.script(layout);
    browser.click(&browser.find("//button[normalize-space()='Send']"));
    // A screenshot while it streams, if it is still streaming.
    if !browser
        .all("//article[@aria-label='Assistant'][@data-streaming='true']")
        .is_empty()
    {
        browser.shot("06-streaming");
    }
    browser.wait("the answer to finish", || {
        browser
            .all("//article[@aria-label='Assistant'][not(@data-streaming)]")
            .first()
            .cloned()
    });
    assert_eq!(
        browser.script(layout),
        before,
        "the prompt, buttons, pipeline or metrics line moved while the answer streamed"
    );
    let answer = browser.script("return document.getElementById('last-answer').textContent");
    assert_eq!(
        answer.as_str().unwrap().trim(),
        reference.trim(),
        "the page's answer differs from `sherpa generate`"
    );
    let metrics = browser.text(&browser.find("//*[@id='metrics']"));
    assert!(metrics.contains("tokens/s"), "metrics line: {metrics:?}");
    let pipeline = browser.text(&browser.find("//*[@id='pipeline']"));
    assert!(
        pipeline.contains("0–10") || pipeline.contains("0..10"),
        "pipeline: {pipeline:?}"
    );
    browser.shot("07-answer");

    // Retry asks again: greedy, so the same answer.
    browser.click(&browser.find("//button[normalize-space()='Retry']"));
    browser.wait("the retried answer to finish", || {
        let answers = browser.all("//article[@aria-label='Assistant']");
        let streaming = browser.all("//article[@aria-label='Assistant'][@data-streaming]");
        (answers.len() == 1 && streaming.is_empty()).then_some(())
    });
    let again = browser.script("return document.getElementById('last-answer').textContent");
    assert_eq!(
        again.as_str().unwrap().trim(),
        reference.trim(),
        "after Retry"
    );

    // Stop ends a long answer and the servers drop its session.
    browser.clear(&max_tokens);
    browser.type_text(&max_tokens, "2000");
    browser.type_text(&prompt, "Tell me a very long story about a mountain.");
    browser.click(&browser.find("//button[normalize-space()='Send']"));
    browser.wait("a few streamed words", || {
        let text = browser.script("return document.getElementById('last-answer').textContent");
        (text.as_str().unwrap_or("").split_whitespace().count() >= 5).then_some(())
    });
    browser.click(&browser.find("//button[normalize-space()='Stop']"));
    browser.wait("the answer to stop", || {
        browser
            .all("//article[@aria-label='Assistant'][@data-streaming]")
            .is_empty()
            .then_some(())
    });
    browser.wait("the servers to drop the stopped session", || {
        swarm
            .servers
            .iter()
            .all(|s| s.current_info().sessions == 0)
            .then_some(())
    });
    let (_, metrics) = common::http("GET", &format!("{}metrics", dashboard.url()), None);
    assert!(
        metrics.contains("sherpa_completions_cancelled_total 1"),
        "{metrics}"
    );
    browser.shot("08-stopped");

    drop(browser);

    // The same page on a phone's screen: nothing wider than the screen.
    let phone = Browser::start(390, 844, true);
    phone.goto(&dashboard.url());
    phone.find("//*[@id='pipeline']//*[contains(., 'blocks 0..10')]");
    let overflow = phone.script("return document.documentElement.scrollWidth - window.innerWidth");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page is {overflow} px wider than a phone"
    );
    phone.shot("09-phone");
    drop(phone);
    runtime.block_on(dashboard.shutdown());
    runtime.block_on(swarm.shutdown());
}
