//! `loadgen scan`: the scan path on this machine.
//!
//! It makes a real ~5 MB JPEG at run time (a fixture photo upscaled to
//! 4000 x 3000 with noise added until the file is about the asked size),
//! starts a testkit nats-server, a stand-in LLM and the gateway in-process
//! (the streamer only in the phases that need it), then measures side by
//! side in one run:
//!
//! - uploads to `202`: the same body to a trivial HTTP sink (what HTTP and
//!   loopback alone cost), the object store `put` alone (what the gateway's
//!   storage step costs, per chunk size, and with the chunk publishes
//!   pipelined), and the gateway's `POST /v1/scans`, raw and multipart, with
//!   the streamer not running and then running;
//! - connect-to-first-event of `GET /v1/scans/{id}/events` for scans in flight;
//! - the local classification time per image and the whole pipeline's time
//!   from upload to `result`, split by stage.
//!
//! It prints a Markdown section and writes it into `BENCHMARKS.md` between
//! its own markers (before the persister section), replacing its previous copy.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use async_nats::jetstream::{self, object_store::ObjectMetadata};
use bus::wire::{ScanEvent, ScanEventData};
use bytes::Bytes;
use clap::Parser as _;
use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use image::{ImageEncoder as _, RgbImage, imageops::FilterType};
use rand::Rng as _;
use testkit::{NatsServer, Script, StandInLlm};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::{procfs, stack, stats};

/// Opens the generated section in BENCHMARKS.md.
const BEGIN: &str = "<!-- loadgen scan: generated section begins -->";
/// Closes it.
const END: &str = "<!-- loadgen scan: generated section ends -->";
/// The heading of the persister section, which this one goes before.
const PERSISTER_HEADING: &str = "# Benchmarks: the persister";
/// The gateway's object chunk (gateway/src/scans.rs `OBJECT_CHUNK`).
const GATEWAY_CHUNK: usize = 512 * 1024;

/// Options of `loadgen scan`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScanArgs {
    /// Concurrent uploaders.
    #[arg(long, default_value_t = 20)]
    uploaders: usize,
    /// Measured uploads per uploader, back to back.
    #[arg(long, default_value_t = 25)]
    uploads: usize,
    /// Unmeasured uploads per uploader before each measured series.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Size of the generated JPEG, MB (10^6 bytes).
    #[arg(long, default_value_t = 5.0)]
    image_mb: f64,
    /// SSE connects measured (each a new request, closed after its first event).
    #[arg(long, default_value_t = 200)]
    sse_connects: usize,
    /// Concurrent SSE clients making those connects.
    #[arg(long, default_value_t = 10)]
    sse_clients: usize,
    /// Scans kept in flight during the SSE phase.
    #[arg(long, default_value_t = 4)]
    sse_scans: usize,
    /// Scans timed one after another from upload to `result`.
    #[arg(long, default_value_t = 20)]
    pipeline_scans: usize,
    /// Timed classifications per fixture photo.
    #[arg(long, default_value_t = 50)]
    classify_runs: usize,
    /// The local image model (default: .data/models/efficientnet-lite0.safetensors).
    #[arg(long, env = "VISION_LOCAL_MODEL")]
    model: Option<PathBuf>,
    /// The streamer's SCAN_CONCURRENCY in the upload phase with the streamer running.
    #[arg(long, default_value_t = 1)]
    upload_scan_concurrency: usize,
    /// Uploads, one at a time, of the unloaded series (0 skips them).
    #[arg(long, default_value_t = 100)]
    single_uploads: usize,
    /// Skip the upload phases with the streamer running.
    #[arg(long)]
    no_streamer_uploads: bool,
    /// Worker threads of each runtime (default: the number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// Where to write the report (default: BENCHMARKS.md at the repository root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report only.
    #[arg(long)]
    no_write: bool,
}

fn say(message: &str) {
    eprintln!("[loadgen scan] {message}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Latencies of one series, sorted, in ms.
#[derive(Debug, Clone, Default)]
struct Series {
    name: String,
    samples: Vec<f64>,
    failures: usize,
    first_failure: Option<String>,
    wall: Duration,
    bytes_each: usize,
    cpu: Vec<(String, f64)>,
}

impl Series {
    fn p(&self, q: f64) -> f64 {
        stats::percentile(&self.samples, q)
    }

    fn row(&self, baseline: Option<&Series>) -> String {
        let n = self.samples.len();
        if n == 0 {
            return format!(
                "| {} | 0 | — | — | — | — | — | — | all {} refused: {} | |",
                self.name,
                self.failures,
                self.first_failure.clone().unwrap_or_default()
            );
        }
        let rate = n as f64 / self.wall.as_secs_f64().max(1e-9);
        let vs = baseline.map_or(String::new(), |b| {
            format!(
                "× {:.1} / × {:.1}",
                self.p(50.0) / b.p(50.0),
                self.p(99.0) / b.p(99.0)
            )
        });
        format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} MB/s | {} | {} |",
            self.name,
            n,
            self.p(50.0),
            self.p(90.0),
            self.p(99.0),
            self.samples.last().copied().unwrap_or(f64::NAN),
            rate,
            rate * self.bytes_each as f64 / 1e6,
            if self.failures == 0 {
                "0".to_owned()
            } else {
                format!(
                    "{} ({})",
                    self.failures,
                    self.first_failure.clone().unwrap_or_default()
                )
            },
            vs,
        )
    }
}

fn cpu_text(cpu: &[(String, f64)]) -> String {
    cpu.iter()
        .map(|(label, pct)| format!("{label} {pct:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------- images

fn fixtures() -> Vec<PathBuf> {
    let dir = testkit::project_root().join("streamer/tests/fixtures/images");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("jpg" | "jpeg" | "png" | "webp")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn jpeg(image: &RgbImage, quality: u8) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// A 4000 x 3000 JPEG of `photo` at quality 92 with noise of the amplitude
/// that brings it closest to `target` bytes (bisection, a few encodes).
fn big_jpeg(photo: &Path, target: usize) -> anyhow::Result<(Vec<u8>, u8)> {
    let base = image::open(photo)
        .with_context(|| format!("cannot decode {}", photo.display()))?
        .resize_exact(4000, 3000, FilterType::Triangle)
        .to_rgb8();
    let mut rng = rand::rng();
    let noise: Vec<i16> = (0..base.as_raw().len())
        .map(|_| rng.random_range(-128..=128))
        .collect();
    let with = |amplitude: u8| -> anyhow::Result<Vec<u8>> {
        let mut img = base.clone();
        for (px, n) in img.iter_mut().zip(&noise) {
            let v = i32::from(*px) + i32::from(*n) * i32::from(amplitude) / 128;
            *px = v.clamp(0, 255) as u8;
        }
        jpeg(&img, 92)
    };
    let (mut lo, mut hi) = (0u8, 64u8);
    let mut best = (with(hi)?, hi);
    for _ in 0..6 {
        let mid = lo + (hi - lo) / 2;
        let bytes = with(mid)?;
        let better = bytes.len().abs_diff(target) < best.0.len().abs_diff(target);
        if bytes.len() < target {
            lo = mid;
        } else {
            hi = mid;
        }
        if better {
            best = (bytes, mid);
        }
        if hi - lo <= 1 {
            break;
        }
    }
    Ok(best)
}

/// `count` distinct photos (crops and mirrors of the fixtures, so that their
/// perceptual hashes differ and no scan hits the result cache), 4000 x 3000,
/// quality 90.
fn distinct_jpegs(count: usize, salt: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let photos: Vec<image::DynamicImage> = fixtures()
        .iter()
        .map(|p| image::open(p).with_context(|| format!("cannot decode {}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!photos.is_empty(), "no fixture photos found");
    (0..count)
        .map(|i| {
            let photo = &photos[i % photos.len()];
            let variant = i / photos.len() + salt;
            let frac = [0.95, 0.8, 0.65, 0.9, 0.7, 0.85, 0.75, 0.6][variant % 8];
            let (w, h) = (photo.width(), photo.height());
            let (cw, ch) = ((w as f64 * frac) as u32, (h as f64 * frac) as u32);
            let x = (w - cw) * ((variant as u32 * 3) % 5) / 4;
            let y = (h - ch) * ((variant as u32 * 2) % 5) / 4;
            let mut img = photo.crop_imm(x, y, cw, ch);
            if variant % 2 == 1 {
                img = img.fliph();
            }
            if variant % 4 >= 2 {
                img = img.flipv();
            }
            jpeg(
                &img.resize_exact(4000, 3000, FilterType::Triangle).to_rgb8(),
                90,
            )
        })
        .collect()
}

fn multipart(image: &[u8]) -> (Bytes, String) {
    let boundary = format!("loadgen-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::with_capacity(image.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\ncontent-type: image/jpeg\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (
        body.into(),
        format!("multipart/form-data; boundary={boundary}"),
    )
}

// ---------------------------------------------------------------- the system

struct StreamerHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

struct System {
    nats_url: String,
    nats_pid: Option<u32>,
    gateway_addr: SocketAddr,
    sink_addr: SocketAddr,
    secret: String,
    llm: StandInLlm,
    model: PathBuf,
    js: jetstream::Context,
    client: async_nats::Client,
    shutdown: CancellationToken,
    streamer: Option<StreamerHandle>,
    gateway_rt: Runtime,
    streamer_rt: Runtime,
    upstream_rt: Runtime,
}

/// A trivial HTTP endpoint that reads the whole body and answers 202: what
/// HTTP and loopback cost for the same upload, without any storage.
async fn sink(request: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match axum::body::to_bytes(request.into_body(), 64 << 20).await {
        Ok(bytes) => (
            axum::http::StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "bytes": bytes.len() })),
        )
            .into_response(),
        Err(_) => axum::http::StatusCode::BAD_REQUEST.into_response(),
    }
}

impl System {
    fn start(
        client_rt: &Runtime,
        nats: &NatsServer,
        workers: usize,
        model: PathBuf,
    ) -> anyhow::Result<Self> {
        let upstream_rt = stack::runtime("lg-upstream", workers)?;
        let streamer_rt = stack::runtime("lg-streamer", workers)?;
        let gateway_rt = stack::runtime("lg-gateway", workers)?;
        let llm = upstream_rt.block_on(StandInLlm::start(Script::new(
            stack::tokens(20),
            Duration::from_millis(1),
        )))?;
        let shutdown = CancellationToken::new();
        let secret = stack::run_secret();
        let gateway_config = gateway::Config::parse_from([
            "gateway".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--nats-url".into(),
            nats.url(),
            "--auth-jwt-secret".into(),
            secret.clone(),
            "--web-dir".into(),
            testkit::project_root().join("web").display().to_string(),
        ]);
        let gateway = gateway_rt
            .block_on(gateway::Gateway::build(gateway_config, shutdown.clone()))
            .context("the gateway did not start")?;
        let gateway_addr = gateway.local_addr()?;
        gateway_rt.spawn(gateway.run(shutdown.clone()));

        // The sink runs on the gateway's runtime, with TCP_NODELAY like it.
        let listener = gateway_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let sink_addr = listener.local_addr()?;
        let stopped = shutdown.clone();
        gateway_rt.spawn(async move {
            use axum::serve::ListenerExt as _;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let app = axum::Router::new().route("/sink", axum::routing::post(sink));
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        let client = client_rt.block_on(nats.client())?;
        let js = {
            let _guard = client_rt.enter();
            jetstream::new(client.clone())
        };
        Ok(Self {
            nats_url: nats.url(),
            nats_pid: procfs::child_named("nats-server"),
            gateway_addr,
            sink_addr,
            secret,
            llm,
            model,
            js,
            client,
            shutdown,
            streamer: None,
            gateway_rt,
            streamer_rt,
            upstream_rt,
        })
    }

    fn start_streamer(&mut self, scan_concurrency: usize) -> anyhow::Result<()> {
        self.stop_streamer();
        let concurrency = scan_concurrency.to_string();
        let config = streamer::Config::parse_from([
            "streamer",
            "--nats-url",
            &self.nats_url,
            "--listen",
            "127.0.0.1:0",
            "--llm-base-url",
            self.llm.base_url(),
            "--vision-local-model",
            &self.model.display().to_string(),
            "--scan-concurrency",
            &concurrency,
        ]);
        let streamer = self
            .streamer_rt
            .block_on(streamer::Streamer::build(config))
            .context("the streamer did not start")?;
        let stop = CancellationToken::new();
        let task = self.streamer_rt.spawn(streamer.run(stop.clone()));
        self.streamer = Some(StreamerHandle { stop, task });
        Ok(())
    }

    fn stop_streamer(&mut self) {
        if let Some(s) = self.streamer.take() {
            s.stop.cancel();
            let _ = self
                .streamer_rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(20), s.task).await });
        }
    }

    /// Drops the stored images and queued jobs (between phases, so that
    /// 2.5 GB per series does not pile up and no backlog of jobs is left
    /// for a streamer started later).
    async fn purge(&self) -> anyhow::Result<()> {
        for stream in ["OBJ_scan_images", bus::streams::SCAN_REQ] {
            self.js
                .get_stream(stream)
                .await
                .with_context(|| format!("stream {stream}"))?
                .purge()
                .await
                .with_context(|| format!("purging {stream}"))?;
        }
        Ok(())
    }

    fn token(&self, user: &str) -> anyhow::Result<String> {
        stack::token_for(&self.secret, user)
    }

    fn stop(mut self) {
        self.stop_streamer();
        self.shutdown.cancel();
        for rt in [self.gateway_rt, self.streamer_rt, self.upstream_rt] {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

// ---------------------------------------------------------------- uploads

#[derive(Clone)]
struct Upload {
    url: String,
    content_type: String,
    body: Bytes,
    image_bytes: usize,
    /// Per uploader, a token for `user-<i>`.
    tokens: Arc<Vec<String>>,
    expect: u16,
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// `per_worker` uploads from each of `workers` clients at once; returns
/// each latency (request start to the response, body included).
async fn upload_series(
    spec: &Upload,
    workers: usize,
    per_worker: usize,
) -> (Vec<f64>, usize, Option<String>) {
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let spec = spec.clone();
            tokio::spawn(async move {
                let http = http_client().expect("client");
                let mut out = Vec::with_capacity(per_worker);
                let mut failures = 0;
                let mut first = None;
                for _ in 0..per_worker {
                    let started = Instant::now();
                    let result = async {
                        let response = http
                            .post(&spec.url)
                            .header("content-type", &spec.content_type)
                            .bearer_auth(&spec.tokens[w % spec.tokens.len()])
                            .body(spec.body.clone())
                            .send()
                            .await
                            .map_err(|e| format!("request: {e}"))?;
                        let status = response.status().as_u16();
                        let text = response.text().await.map_err(|e| format!("body: {e}"))?;
                        if status == spec.expect {
                            Ok(())
                        } else {
                            Err(format!(
                                "HTTP {status}: {}",
                                text.chars().take(120).collect::<String>()
                            ))
                        }
                    }
                    .await;
                    match result {
                        Ok(()) => out.push(ms(started.elapsed())),
                        Err(e) => {
                            failures += 1;
                            first.get_or_insert(e);
                        }
                    }
                }
                (out, failures, first)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failures = 0;
    let mut first = None;
    for task in tasks {
        if let Ok((samples, f, e)) = task.await {
            all.extend(samples);
            failures += f;
            if first.is_none() {
                first = e;
            }
        }
    }
    (all, failures, first)
}

async fn measure_uploads(
    name: &str,
    spec: &Upload,
    args: &ScanArgs,
    nats_pid: Option<u32>,
) -> Series {
    say(&format!("{name}: warm-up"));
    let _ = upload_series(spec, args.uploaders, args.warmup).await;
    say(&format!("{name}: measuring"));
    let before = procfs::cpu_snapshot(nats_pid);
    let started = Instant::now();
    let (mut samples, failures, first_failure) =
        upload_series(spec, args.uploaders, args.uploads).await;
    let wall = started.elapsed();
    let cpu = procfs::cpu_between(&before, &procfs::cpu_snapshot(nats_pid), wall);
    samples.sort_by(f64::total_cmp);
    Series {
        name: name.to_owned(),
        samples,
        failures,
        first_failure,
        wall,
        bytes_each: spec.image_bytes,
        cpu,
    }
}

/// How the object store `put` alone is exercised.
#[derive(Clone, Copy)]
enum StorePut {
    /// `ObjectStore::put` with this chunk size (the client awaits each
    /// chunk's ack before sending the next).
    Sequential(usize),
    /// The same chunks published without waiting, all acks awaited at the
    /// end (what a pipelined put would cost; no metadata written).
    Pipelined(usize),
}

async fn store_series(
    js: &jetstream::Context,
    how: StorePut,
    image: &Bytes,
    workers: usize,
    per_worker: usize,
) -> anyhow::Result<(Vec<f64>, usize, Option<String>)> {
    let store = js.get_object_store(bus::streams::OBJ_SCAN_IMAGES).await?;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (store, js, image) = (store.clone(), js.clone(), image.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut failures = 0;
                let mut first = None;
                for _ in 0..per_worker {
                    let name = uuid::Uuid::now_v7().to_string();
                    let started = Instant::now();
                    let result: anyhow::Result<()> = async {
                        match how {
                            StorePut::Sequential(chunk) => {
                                let meta = ObjectMetadata {
                                    name,
                                    chunk_size: Some(chunk),
                                    ..Default::default()
                                };
                                store.put(meta, &mut image.as_ref()).await?;
                            }
                            StorePut::Pipelined(chunk) => {
                                let subject = format!(
                                    "$O.{}.C.{}",
                                    bus::streams::OBJ_SCAN_IMAGES,
                                    uuid::Uuid::new_v4().simple()
                                );
                                let mut acks = Vec::new();
                                let mut at = 0;
                                while at < image.len() {
                                    let end = (at + chunk).min(image.len());
                                    acks.push(
                                        js.publish(subject.clone(), image.slice(at..end)).await?,
                                    );
                                    at = end;
                                }
                                for ack in acks {
                                    ack.await?;
                                }
                            }
                        }
                        Ok(())
                    }
                    .await;
                    match result {
                        Ok(()) => out.push(ms(started.elapsed())),
                        Err(e) => {
                            failures += 1;
                            first.get_or_insert(format!("{e:#}"));
                        }
                    }
                }
                (out, failures, first)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failures = 0;
    let mut first = None;
    for task in tasks {
        let (samples, f, e) = task.await?;
        all.extend(samples);
        failures += f;
        if first.is_none() {
            first = e;
        }
    }
    Ok((all, failures, first))
}

async fn measure_store(
    name: &str,
    system: &System,
    how: StorePut,
    image: &Bytes,
    args: &ScanArgs,
) -> anyhow::Result<Series> {
    say(&format!("{name}: warm-up"));
    store_series(&system.js, how, image, args.uploaders, args.warmup).await?;
    say(&format!("{name}: measuring"));
    let before = procfs::cpu_snapshot(system.nats_pid);
    let started = Instant::now();
    let (mut samples, failures, first_failure) =
        store_series(&system.js, how, image, args.uploaders, args.uploads).await?;
    let wall = started.elapsed();
    let cpu = procfs::cpu_between(&before, &procfs::cpu_snapshot(system.nats_pid), wall);
    samples.sort_by(f64::total_cmp);
    system.purge().await?;
    Ok(Series {
        name: name.to_owned(),
        samples,
        failures,
        first_failure,
        wall,
        bytes_each: image.len(),
        cpu,
    })
}

// ---------------------------------------------------------------- events

/// Every scan event seen on core NATS, with its arrival time.
type Seen = Arc<Mutex<HashMap<String, Vec<(Instant, ScanEvent)>>>>;

async fn watch_events(client: &async_nats::Client) -> anyhow::Result<Seen> {
    let seen: Seen = Arc::default();
    let mut sub = client.subscribe("scan.evt.>").await?;
    let out = seen.clone();
    tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            let at = Instant::now();
            let Some(scan) = message.subject.as_str().strip_prefix("scan.evt.") else {
                continue;
            };
            if let Ok(event) = serde_json::from_slice::<ScanEvent>(&message.payload) {
                out.lock()
                    .expect("lock")
                    .entry(scan.to_owned())
                    .or_default()
                    .push((at, event));
            }
        }
    });
    Ok(seen)
}

#[derive(serde::Deserialize)]
struct Accepted {
    scan_id: String,
    events_url: String,
}

async fn upload_one(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    image: Bytes,
    lang: &str,
) -> anyhow::Result<Accepted> {
    let response = http
        .post(format!("{base}/v1/scans?lang={lang}"))
        .header("content-type", "image/jpeg")
        .bearer_auth(token)
        .body(image)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().as_u16() == 202,
        "upload answered {}",
        response.status()
    );
    Ok(response.json().await?)
}

/// Label of a milestone: the event name, or `progress <stage> <percent>`.
fn milestone(event: &ScanEvent) -> String {
    match &event.data {
        ScanEventData::Progress(p) => format!(
            "progress {} {}%",
            serde_json::to_value(p.stage)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            p.percent
        ),
        other => other.name().to_owned(),
    }
}

struct Pipeline {
    scans: usize,
    cached: usize,
    failed: usize,
    image_bytes: Vec<usize>,
    accepted: Vec<f64>,
    total: Vec<f64>,
    /// Milestone, median time from upload start, n.
    milestones: Vec<(String, f64, usize)>,
    cpu: Vec<(String, f64)>,
    wall: Duration,
}

async fn pipeline(system: &System, seen: &Seen, images: Vec<Vec<u8>>) -> anyhow::Result<Pipeline> {
    let http = http_client()?;
    let base = format!("http://{}", system.gateway_addr);
    let token = system.token("pipeline")?;
    let mut accepted = Vec::new();
    let mut total = Vec::new();
    let mut per_milestone: Vec<(String, Vec<f64>)> = Vec::new();
    let (mut cached, mut failed) = (0, 0);
    let image_bytes: Vec<usize> = images.iter().map(Vec::len).collect();
    let before = procfs::cpu_snapshot(system.nats_pid);
    let phase_started = Instant::now();
    for (i, image) in images.into_iter().enumerate() {
        let started = Instant::now();
        let ok = upload_one(&http, &base, &token, image.into(), "en").await?;
        accepted.push(ms(started.elapsed()));
        let response = http
            .get(format!("{base}{}", ok.events_url))
            .bearer_auth(&token)
            .send()
            .await?;
        let mut events = response.bytes_stream().eventsource();
        let mut done = false;
        let deadline = tokio::time::sleep(Duration::from_secs(120));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { break };
                    let event = event?;
                    if event.event == "result" {
                        let record: bus::wire::ScanRecord = serde_json::from_str(&event.data)?;
                        cached += usize::from(record.cached);
                        failed += usize::from(record.status != bus::wire::ScanStatus::Done);
                        done = true;
                        break;
                    }
                    if event.event == "error" {
                        failed += 1;
                        done = true;
                        break;
                    }
                }
                () = &mut deadline => break,
            }
        }
        anyhow::ensure!(
            done,
            "scan {i} ({}) did not finish within 120 s",
            ok.scan_id
        );
        total.push(ms(started.elapsed()));
        // The core subscription may trail the SSE stream by a little.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = seen.lock().expect("lock");
        let mut first: Vec<(String, f64)> = Vec::new();
        for (at, event) in seen.get(&ok.scan_id).map(Vec::as_slice).unwrap_or(&[]) {
            let label = milestone(event);
            if !first.iter().any(|(l, _)| *l == label) {
                first.push((label, ms(at.saturating_duration_since(started))));
            }
        }
        for (label, t) in first {
            match per_milestone.iter_mut().find(|(l, _)| *l == label) {
                Some((_, v)) => v.push(t),
                None => per_milestone.push((label, vec![t])),
            }
        }
    }
    let wall = phase_started.elapsed();
    let cpu = procfs::cpu_between(&before, &procfs::cpu_snapshot(system.nats_pid), wall);
    accepted.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    let mut milestones: Vec<(String, f64, usize)> = per_milestone
        .into_iter()
        .map(|(label, mut v)| {
            v.sort_by(f64::total_cmp);
            (label, stats::median(&v), v.len())
        })
        .collect();
    milestones.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(Pipeline {
        scans: total.len(),
        cached,
        failed,
        image_bytes,
        accepted,
        total,
        milestones,
        cpu,
        wall,
    })
}

struct SseResult {
    series: Series,
    terminal_first: usize,
    in_flight_events: (usize, usize),
    scans: usize,
}

/// Starts `args.sse_scans` scans with a slow stand-in (so they stay in their
/// answer stage), then connects SSE clients to them and times each connect
/// to its first event (the replay of the events so far).
async fn sse_phase(
    system: &System,
    seen: &Seen,
    images: Vec<Vec<u8>>,
    args: &ScanArgs,
) -> anyhow::Result<SseResult> {
    let http = http_client()?;
    let base = format!("http://{}", system.gateway_addr);
    let token = system.token("sse")?;
    let mut scans = Vec::new();
    for image in images {
        // lang=ko: a different cache key from the pipeline phase's scans.
        scans.push(upload_one(&http, &base, &token, image.into(), "ko").await?);
    }
    // Wait until every scan streams its answer.
    let ids: Vec<String> = scans.iter().map(|s| s.scan_id.clone()).collect();
    let count_tokens = |id: &str| {
        seen.lock().expect("lock").get(id).map_or(0, |v| {
            v.iter()
                .filter(|(_, e)| matches!(e.data, ScanEventData::Token { .. }))
                .count()
        })
    };
    let events_of = |id: &str| seen.lock().expect("lock").get(id).map_or(0, Vec::len);
    let waited = Instant::now();
    while !ids.iter().all(|id| count_tokens(id) >= 5) {
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(120),
            "the SSE phase's scans did not reach their answer within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say(&format!(
        "SSE: {} scans streaming after {:.1} s",
        ids.len(),
        waited.elapsed().as_secs_f64()
    ));
    let events_before = ids.iter().map(|id| events_of(id)).min().unwrap_or(0);
    let urls: Arc<Vec<String>> = Arc::new(
        scans
            .iter()
            .map(|s| format!("{base}{}", s.events_url))
            .collect(),
    );
    let per_client = args.sse_connects.div_ceil(args.sse_clients.max(1));
    let before = procfs::cpu_snapshot(system.nats_pid);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.sse_clients.max(1))
        .map(|c| {
            let (urls, token) = (urls.clone(), token.clone());
            tokio::spawn(async move {
                let http = http_client().expect("client");
                let mut out = Vec::new();
                let mut terminal = 0;
                let mut failures = 0;
                let mut first = None;
                for k in 0..per_client {
                    let url = &urls[(c + k) % urls.len()];
                    let t0 = Instant::now();
                    let result = async {
                        let response = http
                            .get(url)
                            .bearer_auth(&token)
                            .send()
                            .await
                            .map_err(|e| format!("request: {e}"))?;
                        if response.status().as_u16() != 200 {
                            return Err(format!("HTTP {}", response.status()));
                        }
                        let mut events = response.bytes_stream().eventsource();
                        match events.next().await {
                            Some(Ok(event)) => Ok(event.event),
                            Some(Err(e)) => Err(format!("stream: {e}")),
                            None => Err("closed before any event".to_owned()),
                        }
                    }
                    .await;
                    match result {
                        Ok(name) => {
                            out.push(ms(t0.elapsed()));
                            if name == "result" || name == "error" {
                                terminal += 1;
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            first.get_or_insert(e);
                        }
                    }
                }
                (out, terminal, failures, first)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let (mut terminal_first, mut failures, mut first_failure) = (0, 0, None);
    for task in tasks {
        let (s, t, f, e) = task.await?;
        samples.extend(s);
        terminal_first += t;
        failures += f;
        if first_failure.is_none() {
            first_failure = e;
        }
    }
    let wall = started.elapsed();
    let cpu = procfs::cpu_between(&before, &procfs::cpu_snapshot(system.nats_pid), wall);
    let events_after = ids.iter().map(|id| events_of(id)).max().unwrap_or(0);
    samples.sort_by(f64::total_cmp);
    Ok(SseResult {
        series: Series {
            name: "SSE connect to first event".into(),
            samples,
            failures,
            first_failure,
            wall,
            bytes_each: 0,
            cpu,
        },
        terminal_first,
        in_flight_events: (events_before, events_after),
        scans: ids.len(),
    })
}

// ---------------------------------------------------------------- classification

struct Classify {
    per_image: Vec<(String, u32, u32, f64)>,
    all: Vec<f64>,
    decode_big: Vec<f64>,
}

fn classify(model: &Path, runs: usize, big: &[u8]) -> anyhow::Result<Classify> {
    let vision = streamer::vision::local::LocalVision::load(model, 0.25)
        .with_context(|| format!("cannot load {}", model.display()))?;
    let mut all = Vec::new();
    let mut per_image = Vec::new();
    for path in fixtures() {
        let rgb = image::open(&path)?.to_rgb8();
        vision.top_k(&rgb, 5)?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            vision.top_k(&rgb, 5)?;
            times.push(ms(started.elapsed()));
        }
        times.sort_by(f64::total_cmp);
        per_image.push((
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            rgb.width(),
            rgb.height(),
            stats::median(&times),
        ));
        all.extend(times);
    }
    all.sort_by(f64::total_cmp);
    let mut decode_big = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let _ = image::load_from_memory_with_format(big, image::ImageFormat::Jpeg)?;
        decode_big.push(ms(started.elapsed()));
    }
    decode_big.sort_by(f64::total_cmp);
    Ok(Classify {
        per_image,
        all,
        decode_big,
    })
}

// ---------------------------------------------------------------- the run

/// Runs every phase, prints the section and writes it.
///
/// # Errors
/// When a server does not start or a phase fails.
pub fn run(args: ScanArgs) -> anyhow::Result<()> {
    bus::telemetry::init("warn", false);
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    if profile == "debug" {
        say("This is a debug build: numbers will be far from release ones (use --release).");
    }
    let model = args.model.clone().unwrap_or_else(|| {
        testkit::project_root().join(".data/models/efficientnet-lite0.safetensors")
    });
    anyhow::ensure!(
        model.exists(),
        "{} is missing (scripts/setup.sh writes it)",
        model.display()
    );
    let started_at = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    say("Making the upload image.");
    let target = (args.image_mb * 1e6) as usize;
    let fixtures = fixtures();
    let photo = fixtures
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "coffee.jpg"))
        .or(fixtures.first())
        .context("no fixture photos")?
        .clone();
    let made = Instant::now();
    let (big, amplitude) = big_jpeg(&photo, target)?;
    let big = Bytes::from(big);
    say(&format!(
        "{} bytes (noise amplitude {amplitude}) in {:.1} s",
        big.len(),
        made.elapsed().as_secs_f64()
    ));
    say("Making the distinct pipeline and SSE photos.");
    let pipeline_images = distinct_jpegs(args.pipeline_scans, 0)?;
    let sse_images = distinct_jpegs(args.sse_scans, 0)?;

    say("Classification (before anything else runs).");
    let classified = classify(&model, args.classify_runs, &big)?;

    let client_rt = stack::runtime("lg-client", workers)?;
    let nats = client_rt
        .block_on(NatsServer::start())
        .context("nats-server did not start (run scripts/setup.sh)")?;
    let mut system = System::start(&client_rt, &nats, workers, model.clone())?;
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..args.uploaders)
            .map(|i| system.token(&format!("uploader-{i}")))
            .collect::<anyhow::Result<_>>()?,
    );
    let (multi_body, multi_type) = multipart(&big);
    let raw = Upload {
        url: format!("http://{}/v1/scans", system.gateway_addr),
        content_type: "image/jpeg".into(),
        body: big.clone(),
        image_bytes: big.len(),
        tokens: tokens.clone(),
        expect: 202,
    };
    let multi = Upload {
        content_type: multi_type,
        body: multi_body,
        ..raw.clone()
    };
    let sink = Upload {
        url: format!("http://{}/sink", system.sink_addr),
        ..raw.clone()
    };

    let mut uploads: Vec<Series> = Vec::new();
    let mut streamer_uploads: Vec<Series> = Vec::new();
    let pid = system.nats_pid;
    // Streamer not running: the 202 does not wait for it.
    uploads.push(client_rt.block_on(measure_uploads(
        "HTTP sink (reads the body, answers 202)",
        &sink,
        &args,
        pid,
    )));
    for (name, how) in [
        (
            "object store `put` alone, 512 KiB chunks (as the gateway)",
            StorePut::Sequential(GATEWAY_CHUNK),
        ),
        (
            "object store `put` alone, 128 KiB chunks (async-nats default)",
            StorePut::Sequential(128 * 1024),
        ),
        (
            "512 KiB chunks published pipelined, acks awaited at the end",
            StorePut::Pipelined(GATEWAY_CHUNK),
        ),
    ] {
        uploads.push(client_rt.block_on(measure_store(name, &system, how, &big, &args))?);
    }
    for (name, spec) in [
        ("gateway `POST /v1/scans`, raw image/jpeg", &raw),
        ("gateway `POST /v1/scans`, multipart", &multi),
    ] {
        uploads.push(client_rt.block_on(measure_uploads(name, spec, &args, pid)));
        client_rt.block_on(system.purge())?;
    }

    // The same with one uploader at a time: the latency without queueing.
    let single = ScanArgs {
        uploaders: 1,
        uploads: args.single_uploads,
        warmup: args.warmup.max(1),
        ..args.clone()
    };
    let mut unloaded: Vec<Series> = Vec::new();
    if args.single_uploads > 0 {
        unloaded.push(client_rt.block_on(measure_uploads(
            "HTTP sink, 1 uploader",
            &sink,
            &single,
            pid,
        )));
        for (name, how) in [
            (
                "object store `put` alone, 512 KiB chunks, 1 uploader",
                StorePut::Sequential(GATEWAY_CHUNK),
            ),
            (
                "512 KiB chunks pipelined, 1 uploader",
                StorePut::Pipelined(GATEWAY_CHUNK),
            ),
        ] {
            unloaded.push(client_rt.block_on(measure_store(name, &system, how, &big, &single))?);
        }
        unloaded.push(client_rt.block_on(measure_uploads(
            "gateway, raw, 1 uploader",
            &raw,
            &single,
            pid,
        )));
        client_rt.block_on(system.purge())?;
    }

    if !args.no_streamer_uploads {
        system.start_streamer(args.upload_scan_concurrency)?;
        for (name, spec) in [
            ("gateway, raw, streamer running", &raw),
            ("gateway, multipart, streamer running", &multi),
        ] {
            streamer_uploads.push(client_rt.block_on(measure_uploads(name, spec, &args, pid)));
        }
        system.stop_streamer();
        client_rt.block_on(system.purge())?;
    }

    say("Pipeline: scans one after another, fast stand-in LLM.");
    let seen = client_rt.block_on(watch_events(&system.client))?;
    system.start_streamer(4)?;
    system
        .llm
        .set_script(Script::new(stack::tokens(20), Duration::from_millis(1)));
    let pipe = client_rt.block_on(pipeline(&system, &seen, pipeline_images))?;

    say("SSE: connects to scans in flight.");
    system
        .llm
        .set_script(Script::new(stack::tokens(2000), Duration::from_millis(20)));
    let sse = client_rt.block_on(sse_phase(&system, &seen, sse_images, &args))?;
    let counters = crate_diagnostics();
    say("Stopping.");
    system.stop();
    drop(nats);
    client_rt.shutdown_timeout(Duration::from_secs(2));

    let section = render(&Rendered {
        args: &args,
        profile,
        started_at,
        load_before,
        big_len: big.len(),
        amplitude,
        uploads: &uploads,
        unloaded: &unloaded,
        streamer_uploads: &streamer_uploads,
        pipe: &pipe,
        sse: &sse,
        classified: &classified,
        counters,
    });
    println!("{section}");
    if !args.no_write {
        let path = args
            .out
            .clone()
            .unwrap_or_else(|| testkit::project_root().join("BENCHMARKS.md"));
        write_section(&path, &section)
            .with_context(|| format!("cannot write {}", path.display()))?;
        say(&format!("Wrote {}.", path.display()));
    }
    Ok(())
}

fn crate_diagnostics() -> Vec<String> {
    let text = bus::ops::metrics_handle().render();
    text.lines()
        .filter(|l| {
            (l.starts_with("gateway_scan") || l.starts_with("streamer_scan"))
                && !l.contains("quantile=")
        })
        .map(str::to_owned)
        .collect()
}

struct Rendered<'a> {
    args: &'a ScanArgs,
    profile: &'a str,
    started_at: String,
    load_before: String,
    big_len: usize,
    amplitude: u8,
    uploads: &'a [Series],
    unloaded: &'a [Series],
    streamer_uploads: &'a [Series],
    pipe: &'a Pipeline,
    sse: &'a SseResult,
    classified: &'a Classify,
    counters: Vec<String>,
}

fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**missed**" }
}

fn render(r: &Rendered<'_>) -> String {
    let a = r.args;
    let m = procfs::machine();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(testkit::project_root())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmarks: the scan path\n");
    let _ = writeln!(
        o,
        "Written by `scripts/bench.sh scan` (`cargo run --release -p loadgen -- scan`), which starts everything it measures itself; a re-run replaces the part between the markers.\n"
    );
    let _ = writeln!(o, "## Setup\n");
    let _ = writeln!(
        o,
        "- Machine: {} CPUs ({}), {:.1} GiB RAM, kernel {}; load average before the run: {}.",
        m.cpus,
        m.cpu_model,
        m.mem_gib,
        m.kernel,
        r.load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        o,
        "- Run {} on commit {commit}, **{}** build; everything on loopback on this one machine, sharing its CPUs with the load tool (and with whatever else the shared machine ran: see \"other processes\" in the CPU columns). A testkit nats-server (JetStream, file store in a temp dir), the gateway in-process, the streamer in-process when said (its own Tokio runtime, local EfficientNet-Lite0 vision), a stand-in LLM (testkit `StandInLlm`); each component on its own runtime with {} worker threads.",
        r.started_at,
        r.profile,
        a.workers.unwrap_or(m.cpus)
    );
    let _ = writeln!(
        o,
        "- Upload image: `coffee.jpg` upscaled to 4000 x 3000, noise of amplitude {} added, JPEG quality 92: **{} bytes** ({:.2} MB). Multipart adds a {}-byte envelope.",
        r.amplitude,
        r.big_len,
        r.big_len as f64 / 1e6,
        multipart(&[]).0.len()
    );
    let _ = writeln!(
        o,
        "- Uploads: {} concurrent uploaders (each its own connection, keep-alive, `TCP_NODELAY`), {} warm-up uploads each, then {} measured each, back to back ({} samples per row). Latency: request start to the whole response read (status 202 checked). Between series the object store and `SCAN_REQ` are purged (unmeasured).",
        a.uploaders,
        a.warmup,
        a.uploads,
        a.uploaders * a.uploads
    );
    let _ = writeln!(
        o,
        "- The upload rows run with **no streamer**: the `202` does not wait for it, and a streamer would spend the two CPUs decoding every accepted 12-megapixel JPEG (the hash stage; even a result-cache hit decodes first). The \"streamer running\" rows repeat the gateway series with a streamer consuming the jobs at `SCAN_CONCURRENCY={}` to show that effect.\n",
        a.upload_scan_concurrency
    );

    let _ = writeln!(o, "## Targets\n");
    let gw_raw = r.uploads.iter().find(|s| s.name.contains("raw"));
    let first_event = &r.sse.series;
    let _ = writeln!(o, "| target | measured | |");
    let _ = writeln!(o, "|---|---|---|");
    if let Some(s) = gw_raw {
        let _ = writeln!(
            o,
            "| 5 MB JPEG upload to `202`, p99 <= 50 ms at {} concurrent uploaders (raw, streamer not running) | p50 {:.1} ms, p99 {:.1} ms | {} |",
            a.uploaders,
            s.p(50.0),
            s.p(99.0),
            met(s.p(99.0) <= 50.0 && s.failures == 0)
        );
    }
    for s in r.streamer_uploads.iter().chain(r.unloaded).filter(|s| {
        s.name.starts_with("gateway") && s.name.contains("raw") && !s.samples.is_empty()
    }) {
        let _ = writeln!(
            o,
            "| (the same: {}) | p50 {:.1} ms, p99 {:.1} ms | {} |",
            s.name,
            s.p(50.0),
            s.p(99.0),
            met(s.p(99.0) <= 50.0 && s.failures == 0)
        );
    }
    if let Some(s) = r.uploads.iter().find(|s| s.name.contains("multipart")) {
        if s.samples.is_empty() {
            let _ = writeln!(
                o,
                "| the same, multipart | every upload refused: {} | {} |",
                s.first_failure.clone().unwrap_or_default(),
                met(false)
            );
        } else {
            let _ = writeln!(
                o,
                "| the same, multipart | p50 {:.1} ms, p99 {:.1} ms | {} |",
                s.p(50.0),
                s.p(99.0),
                met(s.p(99.0) <= 50.0 && s.failures == 0)
            );
        }
    }
    let _ = writeln!(
        o,
        "| first SSE event <= 20 ms after connect, scan in flight | p50 {:.1} ms, p99 {:.1} ms ({} connects) | {} |",
        first_event.p(50.0),
        first_event.p(99.0),
        first_event.samples.len(),
        met(first_event.p(99.0) <= 20.0 && first_event.failures == 0)
    );
    let c = &r.classified;
    let _ = writeln!(
        o,
        "| local classification time per image (report) | median {:.1} ms, p90 {:.1} ms | |",
        stats::median(&c.all),
        stats::percentile(&c.all, 90.0)
    );
    let _ = writeln!(
        o,
        "| upload to `result`, fast stand-in LLM (report) | median {:.0} ms over {} scans | |\n",
        stats::median(&r.pipe.total),
        r.pipe.scans
    );

    let header = "| series | n | p50 ms | p90 ms | p99 ms | max ms | uploads/s | throughput | failed | vs HTTP sink p50 / p99 |\n|---|---|---|---|---|---|---|---|---|---|";
    let _ = writeln!(
        o,
        "## Upload to `202` ({} concurrent uploaders)\n",
        a.uploaders
    );
    let _ = writeln!(o, "{header}");
    let sink = r.uploads.first();
    for s in r.uploads.iter().chain(r.streamer_uploads) {
        let _ = writeln!(o, "{}", s.row(sink.filter(|b| b.name != s.name)));
    }
    if !r.unloaded.is_empty() {
        let _ = writeln!(
            o,
            "\nThe same with **one uploader** at a time ({} uploads each; no queueing):\n\n{header}",
            a.single_uploads
        );
        let sink = r.unloaded.first();
        for s in r.unloaded {
            let _ = writeln!(o, "{}", s.row(sink.filter(|b| b.name != s.name)));
        }
    }
    let _ = writeln!(o, "\nCPU during each series, % of one core:\n");
    for s in r.uploads.iter().chain(r.streamer_uploads).chain(r.unloaded) {
        let _ = writeln!(o, "- {}: {}", s.name, cpu_text(&s.cpu));
    }
    let _ = writeln!(o);

    let _ = writeln!(o, "## First SSE event for scans in flight\n");
    let s = &r.sse.series;
    let _ = writeln!(
        o,
        "{} scans uploaded and left streaming their answer (stand-in LLM: 2,000 tokens, 20 ms apart; each scan had at least 5 `token` events before the first connect), then {} clients made {} connects in all, round robin over the scans, each a new `GET /v1/scans/{{id}}/events` with `Authorization: Bearer`, timed from the request start to the first parsed event (the first replayed `progress`), then closed. Events stored per scan: at least {} at the start, at most {} at the end.\n",
        r.sse.scans,
        a.sse_clients,
        s.samples.len() + s.failures,
        r.sse.in_flight_events.0,
        r.sse.in_flight_events.1
    );
    let _ = writeln!(
        o,
        "| | n | p50 ms | p90 ms | p99 ms | max ms | connects/s | failed | first event terminal |\n|---|---|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        o,
        "| connect to first event | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} |\n",
        s.samples.len(),
        s.p(50.0),
        s.p(90.0),
        s.p(99.0),
        s.samples.last().copied().unwrap_or(f64::NAN),
        s.samples.len() as f64 / s.wall.as_secs_f64().max(1e-9),
        s.failures,
        r.sse.terminal_first
    );
    let _ = writeln!(o, "CPU: {}\n", cpu_text(&s.cpu));

    let _ = writeln!(o, "## Classification and the whole pipeline\n");
    let _ = writeln!(
        o,
        "Local classification (EfficientNet-Lite0, candle on CPU), in this process before anything else ran: {} timed `top_k` calls per fixture photo after one warm-up (preprocessing and inference of a decoded image, as `cargo run --release -p streamer --example classify -- --model .data/models/efficientnet-lite0.safetensors --runs {} streamer/tests/fixtures/images/*` measures): **median {:.1} ms, p90 {:.1} ms** over {} calls.\n",
        a.classify_runs,
        a.classify_runs,
        stats::median(&c.all),
        stats::percentile(&c.all, 90.0),
        c.all.len()
    );
    let _ = writeln!(o, "| photo | size | median ms |\n|---|---|---|");
    for (name, w, h, med) in &c.per_image {
        let _ = writeln!(o, "| {name} | {w} x {h} | {med:.1} |");
    }
    let _ = writeln!(
        o,
        "\nDecoding the {:.1} MB upload JPEG (4000 x 3000) once, which the pipeline's hash stage does: median {:.0} ms over {} decodes.\n",
        r.big_len as f64 / 1e6,
        stats::median(&c.decode_big),
        c.decode_big.len()
    );
    let p = &r.pipe;
    let mut sizes = p.image_bytes.clone();
    sizes.sort_unstable();
    let _ = writeln!(
        o,
        "Whole pipeline: {} scans one after another (streamer `SCAN_CONCURRENCY=4`, stand-in LLM 20 tokens 1 ms apart), each a distinct 4000 x 3000 photo (crops and mirrors of the fixtures, JPEG quality 90, {:.1}-{:.1} MB) so that none hits the result cache ({} did; {} failed). Upload to `202`: median {:.1} ms; upload start to the SSE `result`: **median {:.0} ms, p90 {:.0} ms, max {:.0} ms**. Stage split: each event's arrival on a core NATS subscription to `scan.evt.>`, median over the scans, from the upload's start:\n",
        p.scans,
        sizes.first().copied().unwrap_or(0) as f64 / 1e6,
        sizes.last().copied().unwrap_or(0) as f64 / 1e6,
        p.cached,
        p.failed,
        stats::median(&p.accepted),
        stats::median(&p.total),
        stats::percentile(&p.total, 90.0),
        p.total.last().copied().unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        o,
        "| event | median ms from upload start | since the previous row | scans |\n|---|---|---|---|"
    );
    let mut previous = 0.0;
    for (label, median, n) in &p.milestones {
        let _ = writeln!(
            o,
            "| {label} | {median:.0} | +{:.0} | {n} |",
            median - previous
        );
        previous = *median;
    }
    let _ = writeln!(
        o,
        "\nCPU over the pipeline phase ({:.1} s): {}\n",
        p.wall.as_secs_f64(),
        cpu_text(&p.cpu)
    );
    if !r.counters.is_empty() {
        let _ = writeln!(o, "Counters at the end:\n\n```");
        for line in &r.counters {
            let _ = writeln!(o, "{line}");
        }
        let _ = writeln!(o, "```");
    }
    o
}

/// Puts `section` between the markers, replacing the previous copy, or
/// inserts it before the persister section (or at the end).
fn write_section(path: &Path, section: &str) -> std::io::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{}\n{END}", section.trim_end());
    let out = if let (Some(b), Some(e)) = (existing.find(BEGIN), existing.find(END)) {
        format!("{}{block}{}", &existing[..b], &existing[e + END.len()..])
    } else if let Some(at) = existing
        .find(&format!("\n---\n\n{PERSISTER_HEADING}\n"))
        .or_else(|| existing.find(&format!("\n{PERSISTER_HEADING}\n")))
    {
        format!(
            "{}\n\n---\n\n{block}\n{}",
            existing[..at].trim_end(),
            &existing[at..]
        )
    } else {
        format!("{}\n\n---\n\n{block}\n", existing.trim_end())
    };
    std::fs::write(path, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_goes_before_the_persister_and_is_replaced_in_place() {
        let dir = std::env::temp_dir().join(format!("loadgen-scan-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("B.md");
        std::fs::write(
            &path,
            "# chat\n\nnotes\n\n---\n\n# Benchmarks: the persister\n\np\n",
        )
        .unwrap();
        write_section(&path, "one").unwrap();
        write_section(&path, "two").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("one"));
        let (scan, persister) = (
            text.find("two").unwrap(),
            text.find(PERSISTER_HEADING).unwrap(),
        );
        assert!(scan < persister, "{text}");
        assert_eq!(text.matches(BEGIN).count(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn multipart_bodies_carry_the_image_field() {
        let (body, content_type) = multipart(b"JPEG");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("name=\"image\""));
        assert!(content_type.starts_with("multipart/form-data; boundary="));
    }
}
