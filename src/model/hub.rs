//! Hub downloads as containers need them, in the `huggingface_hub` cache layout
//! (`$HF_HOME/hub/models--owner--name/{blobs,refs,snapshots}`): `HF_HUB_OFFLINE=1` reads the cache and
//! never touches the network; every request has a timeout; `HF_TOKEN` (or `$HF_HOME/token`) is sent;
//! a file is fetched only if the revision lists it, resumed with `Range`, and stored by its ETag;
//! progress goes to the log every few seconds (container logs have no terminal for a bar).

use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::ModelError;

/// Where and how to reach the hub; `from_env` reads huggingface_hub's environment variables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    /// The hub cache (the folder holding `models--*`).
    pub cache: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    pub revision: String,
    /// Metadata requests (the revision's file list), whole.
    pub metadata_timeout: Duration,
    /// Downloads: connecting, and each read (a stalled transfer fails; a long one does not).
    pub download_timeout: Duration,
    /// Seconds between progress lines.
    pub progress_every: Duration,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_secs(name: &str, default: f64) -> Duration {
    let secs = env(name)
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0);
    Duration::from_secs_f64(secs.unwrap_or(default))
}

fn truthy(v: Option<String>) -> bool {
    v.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

impl HubConfig {
    pub fn from_env() -> Self {
        let home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        });
        let token = env("HF_TOKEN").or_else(|| {
            fs::read_to_string(home.join("token"))
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
        });
        Self {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_owned(),
            cache: env("HF_HUB_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("hub")),
            token,
            offline: truthy(env("HF_HUB_OFFLINE")),
            revision: env("HF_REVISION").unwrap_or_else(|| "main".into()),
            metadata_timeout: env_secs("HF_HUB_ETAG_TIMEOUT", 10.0),
            download_timeout: env_secs("HF_HUB_DOWNLOAD_TIMEOUT", 30.0),
            progress_every: Duration::from_secs(5),
        }
    }
}

/// One repo at one revision: its file list, and its snapshot folder that `fetch` fills.
pub struct HubRepo<'a> {
    hub: Option<Hub<'a>>,
    repo_dir: PathBuf,
    commit: String,
    files: Vec<String>,
}

impl<'a> HubRepo<'a> {
    /// Asks the hub for the revision's commit and files, or with `offline` only reads the cache.
    pub fn open(repo: &'a str, cfg: &'a HubConfig) -> Result<Self, ModelError> {
        let repo_dir = cfg
            .cache
            .join(format!("models--{}", repo.replace('/', "--")));
        if cfg.offline {
            let commit = offline_commit(repo, cfg, &repo_dir)?;
            return Ok(Self {
                hub: None,
                repo_dir,
                commit,
                files: Vec::new(),
            });
        }
        let hub = Hub::new(repo, cfg);
        let (commit, files) = hub.revision()?;
        let refs = repo_dir.join("refs");
        fs::create_dir_all(&refs).map_err(|e| io_err(&refs, e))?;
        if commit != cfg.revision {
            fs::write(refs.join(&cfg.revision), &commit).map_err(|e| io_err(&refs, e))?;
        }
        Ok(Self {
            hub: Some(hub),
            repo_dir,
            commit,
            files,
        })
    }

    pub fn snapshot(&self) -> PathBuf {
        self.repo_dir.join("snapshots").join(&self.commit)
    }

    /// Whether the revision has this file (offline: whether the cached snapshot has it).
    pub fn has(&self, name: &str) -> bool {
        match self.hub {
            Some(_) => self.files.iter().any(|f| f == name),
            None => self.snapshot().join(name).is_file(),
        }
    }

    /// The file in the snapshot, downloaded first unless it is there.
    pub fn fetch(&self, name: &str) -> Result<PathBuf, ModelError> {
        let path = self.snapshot().join(name);
        match &self.hub {
            _ if path.is_file() => Ok(path),
            Some(hub) => hub.file(&self.repo_dir, &self.snapshot(), &self.commit, name),
            None => Err(ModelError::Checkpoint(format!(
                "HF_HUB_OFFLINE is set and {} is not in the cache",
                path.display()
            ))),
        }
    }
}

fn offline_commit(repo: &str, cfg: &HubConfig, repo_dir: &Path) -> Result<String, ModelError> {
    let commit = fs::read_to_string(repo_dir.join("refs").join(&cfg.revision))
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| cfg.revision.clone());
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if snapshot.join("config.json").is_file() {
        tracing::info!(repo, snapshot = %snapshot.display(), "HF_HUB_OFFLINE: using the cached checkpoint");
        return Ok(commit);
    }
    Err(ModelError::Hub {
        repo: repo.to_owned(),
        message: format!(
            "HF_HUB_OFFLINE is set and revision {} is not in the cache {}",
            cfg.revision,
            cfg.cache.display()
        ),
    })
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_owned(),
        source,
    }
}

struct Hub<'a> {
    repo: &'a str,
    cfg: &'a HubConfig,
    metadata: ureq::Agent,
    download: ureq::Agent,
}

impl<'a> Hub<'a> {
    fn new(repo: &'a str, cfg: &'a HubConfig) -> Self {
        let agent = |b: ureq::AgentBuilder| {
            b.user_agent(concat!("llava-server/", env!("CARGO_PKG_VERSION")))
                .redirects(0)
                .build()
        };
        let t = cfg.download_timeout;
        Self {
            repo,
            cfg,
            metadata: agent(ureq::AgentBuilder::new().timeout(cfg.metadata_timeout)),
            download: agent(
                ureq::AgentBuilder::new()
                    .timeout_connect(t)
                    .timeout_read(t)
                    .timeout_write(t),
            ),
        }
    }

    fn error(&self, message: String) -> ModelError {
        ModelError::Hub {
            repo: self.repo.to_owned(),
            message,
        }
    }

    /// GET, with the token when `to_hub` (never to the storage a redirect points at: its URL is signed).
    fn get(
        &self,
        agent: &ureq::Agent,
        url: &str,
        range_from: u64,
        to_hub: bool,
    ) -> Result<ureq::Response, ModelError> {
        let mut req = agent.get(url);
        if let (true, Some(token)) = (to_hub, &self.cfg.token) {
            req = req.set("authorization", &format!("Bearer {token}"));
        }
        if range_from > 0 {
            req = req.set("range", &format!("bytes={range_from}-"));
        }
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code @ (401 | 403 | 404), _)) => Err(self.error(format!(
                "not found or gated: check the id or set HF_TOKEN (HTTP {code})"
            ))),
            Err(ureq::Error::Status(code, r)) => {
                Err(self.error(format!("{url}: HTTP {code} {}", r.status_text())))
            }
            Err(ureq::Error::Transport(t)) => Err(self.error(format!("{url}: {t}"))),
        }
    }

    /// The revision's commit and file names.
    fn revision(&self) -> Result<(String, Vec<String>), ModelError> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.cfg.endpoint, self.repo, self.cfg.revision
        );
        let body: serde_json::Value = self
            .get(&self.metadata, &url, 0, true)?
            .into_json()
            .map_err(|e| self.error(format!("{url}: {e}")))?;
        let commit = body["sha"]
            .as_str()
            .ok_or_else(|| self.error(format!("{url}: no commit sha in the answer")))?
            .to_owned();
        let files = body["siblings"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|f| f["rfilename"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok((commit, files))
    }

    /// `snapshots/<commit>/<name>`, downloaded into `blobs/<etag>` unless already there.
    fn file(
        &self,
        repo_dir: &Path,
        snapshot: &Path,
        commit: &str,
        name: &str,
    ) -> Result<PathBuf, ModelError> {
        let link = snapshot.join(name);
        if link.is_file() {
            return Ok(link);
        }
        let mut url = format!(
            "{}/{}/resolve/{}/{}",
            self.cfg.endpoint, self.repo, commit, name
        );
        let blobs = repo_dir.join("blobs");
        fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
        // The hub answers large files with a redirect to storage; the first answer's ETag names the blob.
        let mut etag = None;
        let mut partial_path = None;
        let mut have = 0;
        let mut redirected = false;
        for _ in 0..5 {
            let resp = self.get(&self.download, &url, have, !redirected)?;
            etag = etag.or_else(|| {
                resp.header("x-linked-etag")
                    .or_else(|| resp.header("etag"))
                    .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned())
            });
            let Some(tag) = &etag else {
                return Err(self.error(format!("{url}: no ETag in the answer")));
            };
            let blob = blobs.join(tag);
            if blob.is_file() {
                return link_blob(&blob, &link);
            }
            if partial_path.is_none() {
                let p = blobs.join(format!("{tag}.incomplete"));
                have = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                partial_path = Some(p);
                if have > 0 && !(300..400).contains(&resp.status()) {
                    // The first answer was for the whole file: ask again for the missing part.
                    continue;
                }
            }
            if (300..400).contains(&resp.status()) {
                let location = resp
                    .header("location")
                    .ok_or_else(|| self.error(format!("{url}: redirect without a location")))?;
                url = absolute(&url, location);
                redirected = true;
                continue;
            }
            let partial = partial_path.expect("set above");
            let resumed = resp.status() == 206;
            let total = content_length(&resp).map(|n| n + if resumed { have } else { 0 });
            let mut out = fs::OpenOptions::new()
                .create(true)
                .append(resumed)
                .write(true)
                .truncate(!resumed)
                .open(&partial)
                .map_err(|e| io_err(&partial, e))?;
            let start = if resumed { have } else { 0 };
            self.copy(resp.into_reader(), &mut out, name, start, total)
                .map_err(|e| self.error(format!("{name}: {e}")))?;
            fs::rename(&partial, &blob).map_err(|e| io_err(&blob, e))?;
            return link_blob(&blob, &link);
        }
        Err(self.error(format!("{name}: too many redirects")))
    }

    fn copy(
        &self,
        mut from: impl Read,
        to: &mut fs::File,
        name: &str,
        start: u64,
        total: Option<u64>,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let mut done = start;
        let started = Instant::now();
        let mut last_line = started;
        let terminal = std::io::stderr().is_terminal();
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n])?;
            done += n as u64;
            if last_line.elapsed() >= self.cfg.progress_every {
                last_line = Instant::now();
                let line = progress_line(name, done, total, done - start, started.elapsed());
                if terminal {
                    eprint!("\r{line}");
                } else {
                    tracing::info!("{line}");
                }
            }
        }
        if let Some(t) = total {
            if done != t {
                return Err(std::io::Error::other(format!(
                    "the transfer ended at {done} of {t} bytes"
                )));
            }
        }
        if terminal && started.elapsed() >= self.cfg.progress_every {
            eprintln!();
        }
        tracing::info!(
            file = name,
            mib = done as f64 / 1048576.0,
            seconds = started.elapsed().as_secs_f64(),
            "downloaded"
        );
        Ok(())
    }
}

fn content_length(resp: &ureq::Response) -> Option<u64> {
    resp.header("content-length").and_then(|v| v.parse().ok())
}

/// `location` made absolute against `base` (a redirect may give a path only).
fn absolute(base: &str, location: &str) -> String {
    match url::Url::parse(base).and_then(|b| b.join(location)) {
        Ok(u) => u.to_string(),
        Err(_) => location.to_owned(),
    }
}

/// The snapshot entry as a relative symlink to its blob, as huggingface_hub lays it out.
fn link_blob(blob: &Path, link: &Path) -> Result<PathBuf, ModelError> {
    let dir = link.parent().expect("a snapshot file has a folder");
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    // snapshots/<commit>/<a/b/file> → ../../(../)*blobs/<etag>
    let depth = link.components().count()
        - blob
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .components()
            .count()
        - 1;
    let target = PathBuf::from("../".repeat(depth))
        .join("blobs")
        .join(blob.file_name().unwrap());
    let _ = fs::remove_file(link);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, link).map_err(|e| io_err(link, e))?;
    #[cfg(not(unix))]
    fs::copy(blob, link).map_err(|e| io_err(link, e))?;
    Ok(link.to_owned())
}

/// One progress line: "model.safetensors: 1.2 of 13.5 GiB (9%), 85.3 MiB/s".
pub fn progress_line(
    name: &str,
    done: u64,
    total: Option<u64>,
    this_run: u64,
    elapsed: Duration,
) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let rate = this_run as f64 / (1u64 << 20) as f64 / elapsed.as_secs_f64().max(1e-9);
    match total {
        Some(t) if t > 0 => format!(
            "{name}: {:.1} of {:.1} GiB ({:.0}%), {rate:.1} MiB/s",
            gib(done),
            gib(t),
            100.0 * done as f64 / t as f64
        ),
        _ => format!("{name}: {:.1} GiB, {rate:.1} MiB/s", gib(done)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_say_how_far_and_how_fast() {
        let line = progress_line(
            "model.safetensors",
            3 << 29,
            Some(3 << 30),
            100 << 20,
            Duration::from_secs(4),
        );
        assert_eq!(line, "model.safetensors: 1.5 of 3.0 GiB (50%), 25.0 MiB/s");
        assert_eq!(
            progress_line("x", 0, None, 0, Duration::from_secs(1)),
            "x: 0.0 GiB, 0.0 MiB/s"
        );
    }

    #[test]
    fn redirects_resolve_against_the_hub() {
        assert_eq!(
            absolute("http://127.0.0.1:9/o/r/resolve/c/f", "/cdn/f?x=1"),
            "http://127.0.0.1:9/cdn/f?x=1"
        );
        assert_eq!(
            absolute("http://h/a", "https://storage/b"),
            "https://storage/b"
        );
    }
}
