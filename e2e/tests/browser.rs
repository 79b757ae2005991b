//! The web pages in a real headless Chromium: the real gateway, streamer and
//! persister binaries against real nats-server and Postgres, with a stand-in
//! only for the cloud LLM (slow scripted tokens, so the browser has time to
//! act mid-answer). `webtest/run.mjs` drives the browser with playwright-core;
//! this test starts everything, answers its control requests (SIGKILL the
//! gateway and start it again on the same port) and asserts its exit status.
//!
//! Needs `scripts/setup.sh` (Debian `chromium`, `npm ci` in `webtest/`).
//! `UPDATE_SCREENSHOTS=1` rewrites `docs/screenshots/`.

use std::{path::Path, process::Stdio, time::Duration};

use e2e::{Service, build_binaries, token_for};
use testkit::{NatsServer, Postgres, Script, StandInLlm};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser run must finish within this.
const BUDGET: Duration = Duration::from_secs(170);

/// The scripted answer: 38 chunks, 150 ms apart (under 6 s per answer).
fn answer_tokens() -> Vec<String> {
    let words = "Rinse the glass bottle, take off the metal cap and put the bottle in the glass \
                 bin; the cap goes with metal cans. Labels may stay on. Broken glass is wrapped \
                 in newspaper and goes to general waste.";
    words
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// Two different photos to scan: the repository's fixtures when it has them
/// (the coffee cup first: it maps to a waste category), else PNGs made here.
fn scan_images(dir: &Path) -> [std::path::PathBuf; 3] {
    let fixtures = testkit::project_root().join("streamer/tests/fixtures/images");
    let found = ["coffee.jpg", "rocket.jpg", "chelsea.png"].map(|name| fixtures.join(name));
    if found.iter().all(|p| p.exists()) {
        return found;
    }
    [0u8, 1, 2].map(|n| {
        let path = dir.join(format!("made-{n}.png"));
        let image = image::RgbImage::from_fn(96, 160, |x, y| {
            // A bottle-like shape on white, green or brown.
            let neck = (40..56).contains(&x) && y < 50;
            let body = (24..72).contains(&x) && (50..150).contains(&y);
            match (neck || body, n) {
                (true, 0) => image::Rgb([30, 120 + (y % 40) as u8, 60]),
                (true, 1) => image::Rgb([120 + (x % 40) as u8, 70, 20]),
                (true, _) => image::Rgb([20, 60, 110 + ((x + y) % 60) as u8]),
                (false, _) => image::Rgb([250, 250, 250]),
            }
        });
        image.save(&path).expect("test PNG written");
        path
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_pages_work_in_headless_chromium() {
    testkit::init_logs();
    let root = testkit::project_root();
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium)"
    );
    assert!(
        root.join("webtest/node_modules/playwright-core").exists(),
        "webtest/node_modules is missing: run scripts/setup.sh (npm ci in webtest/)"
    );
    let bin = build_binaries().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await.unwrap();
    let pg = Postgres::start().await.unwrap();
    let db = pg.create_database("browser").unwrap();
    let tokens = answer_tokens();
    let llm = StandInLlm::start(Script::new(tokens.clone(), Duration::from_millis(150)))
        .await
        .unwrap();

    let web_dir = ("GATEWAY_WEB_DIR", root.join("web").display().to_string());
    let mut gateway = Service::gateway(
        &bin,
        logs.path(),
        &nats.url(),
        &[("GATEWAY_DEV_LOGIN", "true".into()), web_dir.clone()],
    );
    let gateway_addr = gateway.addr.clone();
    let mut streamer = Service::streamer(&bin, logs.path(), &nats.url(), llm.base_url(), &[]);
    let mut persister = Service::persister(&bin, logs.path(), &nats.url(), &db, data.path(), &[]);
    // A second gateway without dev login: only the pasted-token sign-in.
    let mut plain_gateway = Service::gateway(&bin, logs.path(), &nats.url(), &[web_dir]);
    let plain_addr = plain_gateway.addr.clone();
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();
    plain_gateway.start().await.unwrap();

    let [image, image2, image3] = scan_images(data.path());
    let mut node = tokio::process::Command::new("node")
        .arg(root.join("webtest/run.mjs"))
        .current_dir(root.join("webtest"))
        .env("BASE_URL", format!("http://{gateway_addr}"))
        .env("EXPECTED_ANSWER", tokens.concat())
        .env("PASTE_TOKEN", token_for("pasted-user"))
        .env("SCAN_IMAGE", &image)
        .env("SCAN_IMAGE_2", &image2)
        .env("SCAN_IMAGE_3", &image3)
        .env("BASE_URL_NO_DEV_LOGIN", format!("http://{plain_addr}"))
        .env("SCREENSHOT_DIR", root.join("docs/screenshots"))
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (installed by scripts/setup.sh)");
    let mut control = node.stdin.take().unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();

    // The node side asks for server-side actions with `@@control <what>`
    // lines on stdout and waits for `ok` on stdin; everything else is its
    // report, passed through.
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            match line.strip_prefix("@@control ") {
                Some("kill-gateway") => {
                    gateway.kill();
                    eprintln!("control: gateway SIGKILLed");
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    gateway.start().await.unwrap();
                    eprintln!("control: gateway started again on {gateway_addr}");
                    control.write_all(b"ok\n").await.unwrap();
                }
                Some(other) => panic!("unknown control request {other:?}"),
                None => println!("{line}"),
            }
        }
        node.wait().await.unwrap()
    };
    let outcome = tokio::time::timeout(BUDGET, run).await;
    let logs = format!(
        "gateway log:\n{}\nstreamer log:\n{}\npersister log:\n{}",
        gateway.log_tail(),
        streamer.log_tail(),
        persister.log_tail()
    );
    match outcome {
        Ok(status) => assert!(status.success(), "browser tests failed ({status})\n{logs}"),
        Err(_) => panic!("the browser tests took longer than {BUDGET:?}\n{logs}"),
    }
}
