//! Image bytes from a client-supplied URL (data:, http(s):, and file: under a configured folder) that a
//! client cannot turn against the server: no private targets (checked on every hop and for every resolved
//! address), bounded size while streaming, bounded time, and a header-only pixel check before decoding.

use std::io::Cursor;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::LOCATION;
use tokio::io::AsyncReadExt;
use url::{Host, Url};

mod address;
pub mod data_uri;

pub use address::is_non_public;
use address::{AddressGuard, BlockedAddress, GuardedResolver, LookupFailed};
use data_uri::{decode_data_uri, strip_prefix_ignore_case};

use super::image_decode::{ImageHeader, DEFAULT_MAX_PIXELS};

const WEB_SCHEMES: &str = "http, https or data";
const WEB_AND_FILE_SCHEMES: &str = "http, https, data or file";
const IMAGE_MEDIA_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/webp", "image/gif"];

/// What the fetcher may reach and how much it may read.
#[derive(Debug, Clone)]
pub struct MediaPolicy {
    /// Allow loopback, private, link-local and other non-public targets (`--allow-private-media-hosts`).
    pub allow_private_hosts: bool,
    /// Non-public addresses allowed even when `allow_private_hosts` is false.
    pub private_allowlist: Vec<IpAddr>,
    /// `file://` URLs are served only for files under this folder (after resolving `..` and symlinks).
    pub allowed_local_media_path: Option<PathBuf>,
    /// Cap on the encoded image size, enforced while reading.
    pub max_bytes: usize,
    pub connect_timeout: Duration,
    /// Covers every redirect hop and the body.
    pub total_timeout: Duration,
    pub max_redirects: usize,
    /// Cap on width × height, checked from the header before decoding.
    pub max_pixels: u64,
}

impl Default for MediaPolicy {
    fn default() -> Self {
        Self {
            allow_private_hosts: false,
            private_allowlist: Vec::new(),
            allowed_local_media_path: None,
            max_bytes: 20 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(20),
            max_redirects: 5,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// Everything that can go wrong getting an image, each message naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("invalid image URL: {0}")]
    InvalidUrl(String),
    #[error("image URL scheme \"{scheme}\" is not supported (use {allowed})")]
    UnsupportedScheme {
        scheme: String,
        allowed: &'static str,
    },
    #[error("image URL must not contain credentials (user:password@)")]
    Credentials,
    /// The address stays out of the message: for a DNS name it would tell clients what internal
    /// names resolve to. The fetcher logs it.
    #[error("image URL host is a private or local address, which is not allowed")]
    PrivateAddress(IpAddr),
    #[error("image URL host \"{host}\" could not be resolved: {reason}")]
    Dns { host: String, reason: String },
    #[error("image URL timed out while connecting (limit {} ms)", .0.as_millis())]
    ConnectTimeout(Duration),
    #[error("image URL timed out (limit {} ms)", .0.as_millis())]
    Timeout(Duration),
    #[error("image URL could not be fetched: {0}")]
    Fetch(String),
    #[error("image URL returned HTTP {0}")]
    HttpStatus(u16),
    #[error("image URL redirected more than {0} times")]
    TooManyRedirects(usize),
    #[error("image URL redirect is invalid: {0}")]
    BadRedirect(String),
    #[error("image download exceeds {0} bytes")]
    DownloadTooLarge(usize),
    #[error("image is larger than {0} bytes")]
    TooLarge(usize),
    #[error("image is empty")]
    Empty,
    #[error("invalid data URI: {0}")]
    InvalidDataUri(String),
    #[error("image media type \"{0}\" is not supported (use image/png, image/jpeg, image/webp or image/gif)")]
    UnsupportedMediaType(String),
    #[error("image file URL must name an existing file under the allowed media folder: {0}")]
    LocalFileNotAllowed(String),
    #[error("image file could not be read: {0}")]
    LocalFileRead(String),
    #[error("image is {width}×{height} pixels, more than the {max_pixels} allowed")]
    TooManyPixels {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("image data is not a recognised image format (use PNG, JPEG, WebP or GIF)")]
    NotAnImage,
    #[error("image format {0} is not supported (use PNG, JPEG, WebP or GIF)")]
    UnsupportedFormat(String),
    #[error("image header cannot be read: {0}")]
    BadHeader(String),
    #[error("image fetcher configuration: {0}")]
    Config(String),
}

/// Fetches image bytes under a `MediaPolicy`; cheap to clone (the HTTP client is shared).
#[derive(Debug, Clone)]
pub struct MediaFetcher {
    policy: MediaPolicy,
    client: reqwest::Client,
    /// `allowed_local_media_path` canonicalised once.
    local_root: Option<PathBuf>,
}

impl MediaFetcher {
    pub fn new(policy: MediaPolicy) -> Result<Self, MediaError> {
        let local_root = match &policy.allowed_local_media_path {
            Some(path) => Some(std::fs::canonicalize(path).map_err(|e| {
                MediaError::Config(format!("allowed local media path {}: {e}", path.display()))
            })?),
            None => None,
        };
        let resolver = GuardedResolver {
            guard: AddressGuard::from_policy(&policy),
        };
        let client = reqwest::Client::builder()
            // Redirects are followed by hand so every hop's target is checked before it is contacted.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve names itself and bypass the address checks.
            .no_proxy()
            .referer(false)
            // Clients choose the hosts: keep few idle connections to each, and not for long.
            .pool_max_idle_per_host(4)
            .pool_idle_timeout(Duration::from_secs(30))
            .connect_timeout(policy.connect_timeout)
            .timeout(policy.total_timeout)
            .dns_resolver(Arc::new(resolver))
            .user_agent(concat!("llava-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| MediaError::Config(error_chain(&e)))?;
        Ok(Self {
            policy,
            client,
            local_root,
        })
    }

    pub fn policy(&self) -> &MediaPolicy {
        &self.policy
    }

    /// The encoded bytes behind `url`: a `data:` URI (base64 or percent-encoded, image media types only),
    /// an `http(s)` URL, or a `file://` URL under `allowed_local_media_path`.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, MediaError> {
        let url = url.trim();
        let bytes = if let Some(rest) = strip_prefix_ignore_case(url, "data:") {
            decode_data_uri(rest, self.policy.max_bytes)?
        } else {
            let parsed = Url::parse(url).map_err(|e| MediaError::InvalidUrl(e.to_string()))?;
            let total = self.policy.total_timeout;
            match parsed.scheme() {
                "http" | "https" => tokio::time::timeout(total, self.fetch_http(parsed))
                    .await
                    .map_err(|_| MediaError::Timeout(total))??,
                "file" if self.local_root.is_some() => {
                    tokio::time::timeout(total, self.fetch_file(&parsed))
                        .await
                        .map_err(|_| MediaError::Timeout(total))??
                }
                other => return Err(self.unsupported_scheme(other)),
            }
        };
        if bytes.is_empty() {
            return Err(MediaError::Empty);
        }
        Ok(bytes)
    }

    fn unsupported_scheme(&self, scheme: &str) -> MediaError {
        let allowed = if self.local_root.is_some() {
            WEB_AND_FILE_SCHEMES
        } else {
            WEB_SCHEMES
        };
        MediaError::UnsupportedScheme {
            scheme: scheme.to_owned(),
            allowed,
        }
    }

    async fn fetch_http(&self, mut url: Url) -> Result<Vec<u8>, MediaError> {
        let guard = AddressGuard::from_policy(&self.policy);
        let mut redirects = 0;
        loop {
            self.check_http_target(&url, &guard)?;
            let response = self
                .client
                .get(url.clone())
                .send()
                .await
                .map_err(|e| self.request_error(&url, e))?;
            let status = response.status();
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                if redirects >= self.policy.max_redirects {
                    return Err(MediaError::TooManyRedirects(self.policy.max_redirects));
                }
                let location = response
                    .headers()
                    .get(LOCATION)
                    .ok_or_else(|| MediaError::BadRedirect("no Location header".into()))?
                    .to_str()
                    .map_err(|_| MediaError::BadRedirect("Location is not ASCII".into()))?;
                url = url.join(location).map_err(|e| {
                    MediaError::BadRedirect(format!("Location \"{location}\": {e}"))
                })?;
                redirects += 1;
                continue;
            }
            if !status.is_success() {
                return Err(MediaError::HttpStatus(status.as_u16()));
            }
            return self.read_body(response, &url).await;
        }
    }

    /// Scheme, credentials and IP-literal hosts; DNS names are checked by `GuardedResolver` when connecting.
    fn check_http_target(&self, url: &Url, guard: &AddressGuard) -> Result<(), MediaError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(MediaError::UnsupportedScheme {
                scheme: url.scheme().to_owned(),
                allowed: "http or https after a redirect",
            });
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(MediaError::Credentials);
        }
        let literal = match url.host() {
            None => return Err(MediaError::InvalidUrl("the URL has no host".into())),
            Some(Host::Domain(_)) => None,
            Some(Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        };
        match literal {
            Some(ip) if !guard.allows(ip) => Err(MediaError::PrivateAddress(ip)),
            _ => Ok(()),
        }
    }

    async fn read_body(
        &self,
        mut response: reqwest::Response,
        url: &Url,
    ) -> Result<Vec<u8>, MediaError> {
        let max = self.policy.max_bytes;
        let announced = response.content_length();
        if announced.is_some_and(|len| len > max as u64) {
            return Err(MediaError::DownloadTooLarge(max));
        }
        let mut body = Vec::with_capacity(announced.map_or(64 * 1024, |len| len as usize));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.request_error(url, e))?
        {
            if body.len() + chunk.len() > max {
                // Dropping the response closes the connection: nothing past the cap is read.
                return Err(MediaError::DownloadTooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn request_error(&self, url: &Url, error: reqwest::Error) -> MediaError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        while let Some(err) = source {
            if let Some(blocked) = err.downcast_ref::<BlockedAddress>() {
                tracing::info!(host = url.host_str().unwrap_or_default(), address = %blocked.0, "image URL refused: the host resolves to a non-public address");
                return MediaError::PrivateAddress(blocked.0);
            }
            if let Some(failed) = err.downcast_ref::<LookupFailed>() {
                return MediaError::Dns {
                    host: url.host_str().unwrap_or_default().to_owned(),
                    reason: failed.0.clone(),
                };
            }
            source = err.source();
        }
        if error.is_timeout() {
            if error.is_connect() {
                MediaError::ConnectTimeout(self.policy.connect_timeout)
            } else {
                MediaError::Timeout(self.policy.total_timeout)
            }
        } else {
            MediaError::Fetch(error_chain(&error.without_url()))
        }
    }

    async fn fetch_file(&self, url: &Url) -> Result<Vec<u8>, MediaError> {
        let Some(root) = &self.local_root else {
            return Err(self.unsupported_scheme("file"));
        };
        let not_allowed = || MediaError::LocalFileNotAllowed(url.path().to_owned());
        let path = url.to_file_path().map_err(|_| not_allowed())?;
        // Canonicalising resolves `..` and symlinks, so the prefix test sees the real location.
        let real = tokio::fs::canonicalize(&path)
            .await
            .map_err(|_| not_allowed())?;
        if !real.starts_with(root) {
            return Err(not_allowed());
        }
        // Only regular files: opening a FIFO would block a worker until some writer appeared. The
        // check comes before the open, and the open does not block, in case the path changes between.
        let is_file = tokio::fs::metadata(&real).await.is_ok_and(|m| m.is_file());
        if !is_file {
            return Err(not_allowed());
        }
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&real)
            .await
            .map_err(|e| MediaError::LocalFileRead(e.to_string()))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| MediaError::LocalFileRead(e.to_string()))?;
        if !meta.is_file() {
            return Err(not_allowed());
        }
        let max = self.policy.max_bytes;
        if meta.len() > max as u64 {
            return Err(MediaError::TooLarge(max));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // The file may grow after the size check: read at most one byte past the cap.
        file.take(max as u64 + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| MediaError::LocalFileRead(e.to_string()))?;
        if bytes.len() > max {
            return Err(MediaError::TooLarge(max));
        }
        Ok(bytes)
    }
}

/// Format, width and height from the image header alone, refusing unknown formats and images over
/// `max_pixels`: the first look at client bytes, before anything is decoded or allocated for them.
pub fn read_header(bytes: &[u8], max_pixels: u64) -> Result<ImageHeader, MediaError> {
    use image::ImageFormat;
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| MediaError::BadHeader(e.to_string()))?;
    let format = match reader.format() {
        None => return Err(MediaError::NotAnImage),
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif)) => {
            f
        }
        Some(other) => return Err(MediaError::UnsupportedFormat(format!("{other:?}"))),
    };
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| MediaError::BadHeader(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(MediaError::TooManyPixels {
            width,
            height,
            max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(MediaError::BadHeader(format!("{width}×{height} pixels")));
    }
    Ok(ImageHeader {
        format,
        width,
        height,
    })
}

/// "outer: inner: innermost", since reqwest's own message rarely names the cause.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(err) = source {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests;
