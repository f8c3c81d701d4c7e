//! Hub downloads against a fake hub on loopback that answers in the Hugging Face hub's layout
//! (`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{rev}/{file}` with ETag, a redirect to
//! storage for the weights, Range): the snapshot holds the fixture's exact bytes in huggingface_hub's
//! cache layout, the token is sent to the hub and not to storage, an interrupted download resumes,
//! offline mode makes no request, gated or missing repos say so, and a hub that never answers times out.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llava_server::model::hub::{HubConfig, HubRepo};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    range: Option<String>,
}

/// A fake hub serving tests/fixtures/tiny as `owner/tiny`; `owner/gated` needs the token "hf_test".
struct FakeHub {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn etag_of(name: &str) -> String {
    // Any stable string the test can predict; the hub uses the file's sha256 for LFS files.
    format!("etag-{}", name.replace('.', "-"))
}

fn respond(mut s: TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn serve(
    stream: TcpStream,
    repo_name: &str,
    files: &HashMap<String, Vec<u8>>,
    seen: &Mutex<Vec<Seen>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap() == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let auth = headers.get("authorization").cloned();
    let range = headers.get("range").cloned();
    seen.lock().unwrap().push(Seen {
        path: path.clone(),
        authorization: auth.clone(),
        range: range.clone(),
    });
    let gated_ok = auth.as_deref() == Some("Bearer hf_test");
    let repo_ok = |repo: &str| repo == repo_name || (repo == "owner/gated" && gated_ok);
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let (repo, _rev) = rest.split_once("/revision/").unwrap();
        if !repo_ok(repo) {
            return respond(
                stream,
                "401 Unauthorized",
                &[],
                b"{\"error\":\"Repository not found\"}",
            );
        }
        let siblings: Vec<String> = files
            .keys()
            .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\":\"{repo}\",\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        return respond(stream, "200 OK", &[], body.as_bytes());
    }
    if let Some(name) = path.strip_prefix("/cdn/") {
        // Storage: no token expected, Range honoured.
        let data = &files[name];
        if let Some(from) = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
        {
            let from: usize = from.parse().unwrap();
            let h = vec![(
                "content-range".to_owned(),
                format!("bytes {from}-{}/{}", data.len() - 1, data.len()),
            )];
            return respond(stream, "206 Partial Content", &h, &data[from..]);
        }
        return respond(stream, "200 OK", &[], data);
    }
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() == 5 && parts[2] == "resolve" {
        let repo = format!("{}/{}", parts[0], parts[1]);
        let name = parts[4];
        if !repo_ok(&repo) || !files.contains_key(name) {
            return respond(stream, "404 Not Found", &[], b"");
        }
        let etag = ("etag".to_owned(), format!("\"{}\"", etag_of(name)));
        if name.ends_with(".safetensors") {
            // Large files: a redirect to storage, the blob's ETag in X-Linked-Etag (as the hub does).
            let h = vec![
                ("location".to_owned(), format!("/cdn/{name}")),
                ("x-linked-etag".to_owned(), etag.1.clone()),
                ("etag".to_owned(), "\"pointer-etag\"".to_owned()),
            ];
            return respond(stream, "302 Found", &h, b"");
        }
        return respond(stream, "200 OK", &[etag], &files[name]);
    }
    respond(stream, "404 Not Found", &[], b"");
}

fn fake_hub() -> FakeHub {
    fake_hub_serving("owner/tiny", &fixture())
}

/// A fake hub serving the files of `dir` as the repository `repo` (and as `owner/gated`).
fn fake_hub_serving(repo: &str, dir: &Path) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let repo = repo.to_owned();
    let mut files = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        files.insert(
            p.file_name().unwrap().to_str().unwrap().to_owned(),
            std::fs::read(&p).unwrap(),
        );
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            serve(stream.unwrap(), &repo, &files, &log);
        }
    });
    FakeHub { base, seen }
}

fn config(endpoint: &str, cache: &Path) -> HubConfig {
    HubConfig {
        endpoint: endpoint.to_owned(),
        cache: cache.to_owned(),
        token: None,
        offline: false,
        revision: "main".into(),
        metadata_timeout: Duration::from_secs(2),
        download_timeout: Duration::from_secs(2),
        progress_every: Duration::from_secs(5),
    }
}

fn fetch_all(repo: &HubRepo) {
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(repo.has(name), "{name} listed");
        repo.fetch(name).unwrap();
    }
}

#[test]
fn downloads_into_the_hub_cache_layout_with_the_token_sent_to_the_hub_only() {
    let hub = fake_hub();
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&hub.base, cache.path());
    cfg.token = Some("hf_test".into());
    let repo = HubRepo::open("owner/gated", &cfg).unwrap();
    fetch_all(&repo);
    let dir = cache.path().join("models--owner--gated");
    assert_eq!(
        std::fs::read_to_string(dir.join("refs/main")).unwrap(),
        COMMIT
    );
    assert_eq!(repo.snapshot(), dir.join("snapshots").join(COMMIT));
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let link = repo.snapshot().join(name);
        assert_eq!(
            std::fs::read(&link).unwrap(),
            std::fs::read(fixture().join(name)).unwrap(),
            "{name}"
        );
        // A relative symlink into blobs/, named by the file's ETag (X-Linked-Etag for the weights).
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from("../../blobs").join(etag_of(name))
        );
    }
    assert!(!repo.has("no-such-file.bin"));
    let seen = hub.seen.lock().unwrap().clone();
    for s in &seen {
        let to_hub = !s.path.starts_with("/cdn/");
        assert_eq!(s.authorization.is_some(), to_hub, "{s:?}");
    }
    // A second open finds every file in place: only the revision is asked for.
    let before = seen.len();
    let again = HubRepo::open("owner/gated", &cfg).unwrap();
    fetch_all(&again);
    let seen = hub.seen.lock().unwrap();
    assert_eq!(seen.len(), before + 1);
    assert!(seen
        .last()
        .unwrap()
        .path
        .starts_with("/api/models/owner/gated/revision/main"));
}

#[test]
fn an_interrupted_download_resumes_with_range() {
    let hub = fake_hub();
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub.base, cache.path());
    let weights = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let blobs = cache.path().join("models--owner--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = weights.len() / 2;
    std::fs::write(
        blobs.join(format!("{}.incomplete", etag_of("model.safetensors"))),
        &weights[..half],
    )
    .unwrap();
    let repo = HubRepo::open("owner/tiny", &cfg).unwrap();
    let path = repo.fetch("model.safetensors").unwrap();
    assert_eq!(std::fs::read(path).unwrap(), weights);
    let seen = hub.seen.lock().unwrap();
    let storage: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == "/cdn/model.safetensors")
        .collect();
    assert_eq!(storage.len(), 1);
    assert_eq!(
        storage[0].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
}

#[test]
fn offline_mode_reads_the_cache_and_makes_no_request() {
    let hub = fake_hub();
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub.base, cache.path());
    fetch_all(&HubRepo::open("owner/tiny", &cfg).unwrap());
    let requests = hub.seen.lock().unwrap().len();
    // Offline, with an endpoint nothing listens on: served from the cache.
    let mut offline = config("http://127.0.0.1:9", cache.path());
    offline.offline = true;
    let repo = HubRepo::open("owner/tiny", &offline).unwrap();
    assert!(repo.has("model.safetensors"));
    let config_json = repo.fetch("config.json").unwrap();
    assert_eq!(
        std::fs::read(config_json).unwrap(),
        std::fs::read(fixture().join("config.json")).unwrap()
    );
    assert_eq!(hub.seen.lock().unwrap().len(), requests);
    // A repo that was never downloaded fails at once, and says why.
    let err = HubRepo::open("owner/other", &offline)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn missing_or_gated_repos_say_so() {
    let hub = fake_hub();
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub.base, cache.path());
    for repo in ["owner/gated", "owner/missing"] {
        let err = HubRepo::open(repo, &cfg).err().unwrap().to_string();
        assert!(
            err.contains("not found or gated: check the id or set HF_TOKEN"),
            "{err}"
        );
    }
    let repo = HubRepo::open("owner/tiny", &cfg).unwrap();
    let err = repo.fetch("absent.json").unwrap_err().to_string();
    assert!(err.contains("not found or gated"), "{err}");
}

#[test]
fn a_hub_that_accepts_but_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let mut s = s.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            keep.lock().unwrap().push(s); // never answered, never closed
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&base, cache.path());
    cfg.metadata_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let err = HubRepo::open("owner/tiny", &cfg).err().unwrap().to_string();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        err.to_lowercase().contains("timed out") || err.contains("timeout"),
        "{err}"
    );
}

#[test]
fn an_original_checkpoints_vision_tower_is_fetched_by_its_hub_id() {
    // The fixture's config names `openai/clip-vit-large-patch14-336`; the fake hub serves the tiny
    // CLIP tower (a `pytorch_model.bin`, an old-style preprocessor config) under that id. The hub is
    // reached through the environment, as `serve` reaches it; no other test here reads it.
    let tower = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/original/clip-336");
    let hub = fake_hub_serving("openai/clip-vit-large-patch14-336", &tower);
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("HF_ENDPOINT", &hub.base);
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/original/llava-v1.5-tiny");
    let (loaded, _) = llava_server::model::load_model(
        model.to_str().unwrap(),
        llava_server::model::LoadFormat::Auto,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let original = loaded.config.original.as_ref().unwrap();
    let snapshot = cache
        .path()
        .join("models--openai--clip-vit-large-patch14-336/snapshots")
        .join(COMMIT);
    assert_eq!(original.vision_tower, snapshot);
    for name in [
        "config.json",
        "preprocessor_config.json",
        "pytorch_model.bin",
    ] {
        assert_eq!(
            std::fs::read(snapshot.join(name)).unwrap(),
            std::fs::read(tower.join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(loaded.config.image_feature_count(), 576);
}
