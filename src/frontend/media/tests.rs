use super::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::path::Path;

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name);
    std::fs::read(path).expect("fixture image")
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A PNG whose header claims `width`×`height` RGB pixels; the pixel data is a stub.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn fetcher(policy: MediaPolicy) -> MediaFetcher {
    MediaFetcher::new(policy).expect("fetcher")
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
}

#[test]
fn non_public_addresses() {
    let non_public = [
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "127.0.0.1",
        "127.255.255.254",
        "100.64.0.1",
        "100.127.255.255",
        "169.254.169.254",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "192.0.0.8",
        "192.0.2.1",
        "198.18.0.1",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::1",
        "2002:7f00:1::1",
        "2002:c0a8:101::1",
        "fe80::1",
        "febf::1",
        "fec0::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "2001:db8::1",
        "2001::1",
        "3fff::1",
        "100::1",
    ];
    for text in non_public {
        let ip: IpAddr = text.parse().unwrap();
        assert!(is_non_public(ip), "{text} should be non-public");
    }
    let public = [
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",
        "100.128.0.1",
        "172.15.0.1",
        "172.32.0.1",
        "169.253.1.1",
        "192.0.3.1",
        "198.20.0.1",
        "223.255.255.255",
        "2001:4860::8888",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
        "2400:cb00::1",
    ];
    for text in public {
        let ip: IpAddr = text.parse().unwrap();
        assert!(!is_non_public(ip), "{text} should be public");
    }
}

#[test]
fn allowlist_admits_only_the_listed_addresses() {
    let guard = AddressGuard {
        allow_private_hosts: false,
        private_allowlist: vec!["127.0.0.2".parse().unwrap()],
    };
    assert!(guard.allows("127.0.0.2".parse().unwrap()));
    assert!(guard.allows("::ffff:127.0.0.2".parse().unwrap()));
    assert!(!guard.allows("127.0.0.1".parse().unwrap()));
    assert!(guard.allows("8.8.8.8".parse().unwrap()));
}

#[test]
fn data_uri_base64_png_is_decoded() {
    let png = fixture("scene_336x336.png");
    let uri = format!("data:image/png;base64,{}", STANDARD.encode(&png));
    let bytes = block_on(fetcher(MediaPolicy::default()).fetch(&uri)).unwrap();
    assert_eq!(bytes, png);
    assert_eq!(
        read_header(&bytes, 8192 * 8192)
            .map(|h| (h.width, h.height))
            .unwrap(),
        (336, 336)
    );
}

#[test]
fn data_uri_variants_are_accepted() {
    let png = fixture("gray_300x200.png");
    let unpadded = STANDARD.encode(&png).trim_end_matches('=').to_owned();
    let wrapped: String = STANDARD
        .encode(&png)
        .as_bytes()
        .chunks(76)
        .map(|line| format!("{}\n", std::str::from_utf8(line).unwrap()))
        .collect();
    let escaped: String = png.iter().map(|b| format!("%{b:02X}")).collect();
    for uri in [
        format!("DATA:Image/PNG;BASE64,{unpadded}"),
        format!("data:image/png;name=x.png;base64,{wrapped}"),
        format!("data:image/png,{escaped}"),
    ] {
        let bytes = decode_data_uri(uri.split_once(':').unwrap().1, 1 << 20).unwrap();
        assert_eq!(bytes, png);
    }
}

#[test]
fn data_uri_refusals() {
    let f = fetcher(MediaPolicy::default());
    let err = block_on(f.fetch("data:text/plain;base64,aGVsbG8=")).unwrap_err();
    assert!(
        matches!(err, MediaError::UnsupportedMediaType(ref t) if t == "text/plain"),
        "{err}"
    );
    assert!(err.to_string().contains("text/plain"), "{err}");

    let err = block_on(f.fetch("data:image/svg+xml;base64,PHN2Zz4=")).unwrap_err();
    assert!(matches!(err, MediaError::UnsupportedMediaType(_)), "{err}");

    let err = block_on(f.fetch("data:image/png;base64,!!!not base64***")).unwrap_err();
    assert!(matches!(err, MediaError::InvalidDataUri(_)), "{err}");
    assert!(
        err.to_string().starts_with("invalid data URI: bad base64"),
        "{err}"
    );

    let err = block_on(f.fetch("data:image/png;base64")).unwrap_err();
    assert!(matches!(err, MediaError::InvalidDataUri(_)), "{err}");

    let err = block_on(f.fetch("data:;base64,aGVsbG8=")).unwrap_err();
    assert!(matches!(err, MediaError::InvalidDataUri(_)), "{err}");

    let err = block_on(f.fetch("data:image/png,%zz")).unwrap_err();
    assert!(err.to_string().contains("percent-escape"), "{err}");

    let err = block_on(f.fetch("data:image/png;base64,")).unwrap_err();
    assert!(matches!(err, MediaError::Empty), "{err}");
}

#[test]
fn data_uri_over_the_cap_is_refused() {
    let payload = STANDARD.encode(vec![0u8; 4096]);
    let err = decode_data_uri(&format!("image/png;base64,{payload}"), 1000).unwrap_err();
    assert!(matches!(err, MediaError::TooLarge(1000)), "{err}");
    // Just over the cap: passes the cheap pre-check, caught after decoding.
    let payload = STANDARD.encode(vec![0u8; 1001]);
    let err = decode_data_uri(&format!("image/png;base64,{payload}"), 1000).unwrap_err();
    assert!(matches!(err, MediaError::TooLarge(1000)), "{err}");
}

#[test]
fn unsupported_schemes_are_refused() {
    let f = fetcher(MediaPolicy::default());
    for (url, scheme) in [
        ("ftp://example.com/a.png", "ftp"),
        ("file:///etc/passwd", "file"),
        ("javascript:alert(1)", "javascript"),
        ("gopher://127.0.0.1:6379/_x", "gopher"),
    ] {
        let err = block_on(f.fetch(url)).unwrap_err();
        assert!(
            matches!(err, MediaError::UnsupportedScheme { scheme: ref s, .. } if s == scheme),
            "{url}: {err}"
        );
        assert_eq!(
            err.to_string(),
            format!("image URL scheme \"{scheme}\" is not supported (use http, https or data)")
        );
    }
    let err = block_on(f.fetch("not a url")).unwrap_err();
    assert!(matches!(err, MediaError::InvalidUrl(_)), "{err}");
}

#[test]
fn credentials_and_private_literals_are_refused_without_a_request() {
    let f = fetcher(MediaPolicy::default());
    let err = block_on(f.fetch("http://user:pass@example.com/a.png")).unwrap_err();
    assert!(matches!(err, MediaError::Credentials), "{err}");
    for url in [
        "http://127.0.0.1:9/a.png",
        "http://2130706433:9/a.png",
        "http://0x7f.1:9/a.png",
        "http://[::1]:9/a.png",
        "http://[::ffff:127.0.0.1]:9/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "https://10.0.0.1/a.png",
    ] {
        let err = block_on(f.fetch(url)).unwrap_err();
        assert!(matches!(err, MediaError::PrivateAddress(_)), "{url}: {err}");
        assert!(err
            .to_string()
            .starts_with("image URL host is a private or local address"));
    }
}

#[test]
fn a_name_resolving_to_loopback_is_refused() {
    let f = fetcher(MediaPolicy::default());
    let err = block_on(f.fetch("http://localhost:9/a.png")).unwrap_err();
    assert!(
        matches!(err, MediaError::PrivateAddress(ip) if ip.is_loopback()),
        "{err}"
    );
}

#[test]
fn file_urls_under_the_allowed_folder_only() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let png = fixture("scene_336x336.png");
    std::fs::create_dir(root.path().join("sub")).unwrap();
    std::fs::write(root.path().join("sub/ok.png"), &png).unwrap();
    std::fs::write(outside.path().join("secret.png"), &png).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        outside.path().join("secret.png"),
        root.path().join("link.png"),
    )
    .unwrap();

    let f = fetcher(MediaPolicy {
        allowed_local_media_path: Some(root.path().to_owned()),
        ..MediaPolicy::default()
    });
    let ok = Url::from_file_path(root.path().join("sub/ok.png")).unwrap();
    assert_eq!(block_on(f.fetch(ok.as_str())).unwrap(), png);

    let escapes = [
        Url::from_file_path(outside.path().join("secret.png"))
            .unwrap()
            .to_string(),
        format!(
            "file://{}/sub/../../{}/secret.png",
            root.path().display(),
            outside.path().file_name().unwrap().to_str().unwrap()
        ),
        format!(
            "file://{}/sub/%2e%2e/%2e%2e/etc/passwd",
            root.path().display()
        ),
        format!("file://{}/missing.png", root.path().display()),
        format!("file://{}/sub", root.path().display()),
        #[cfg(unix)]
        format!("file://{}/link.png", root.path().display()),
    ];
    for url in escapes {
        let err = block_on(f.fetch(&url)).unwrap_err();
        assert!(
            matches!(err, MediaError::LocalFileNotAllowed(_)),
            "{url}: {err}"
        );
    }

    let small = fetcher(MediaPolicy {
        allowed_local_media_path: Some(root.path().to_owned()),
        max_bytes: 100,
        ..MediaPolicy::default()
    });
    let err = block_on(small.fetch(ok.as_str())).unwrap_err();
    assert!(matches!(err, MediaError::TooLarge(100)), "{err}");
}

#[cfg(unix)]
#[test]
fn a_fifo_in_the_allowed_folder_is_refused_without_blocking() {
    let root = tempfile::tempdir().unwrap();
    let fifo = root.path().join("pipe.png");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid, NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let f = fetcher(MediaPolicy {
        allowed_local_media_path: Some(root.path().to_owned()),
        ..MediaPolicy::default()
    });
    let url = Url::from_file_path(&fifo).unwrap();
    let started = std::time::Instant::now();
    // No writer ever opens the FIFO: a blocking open would hang here (bounded by the fetch timeout).
    let err = block_on(f.fetch(url.as_str())).unwrap_err();
    assert!(matches!(err, MediaError::LocalFileNotAllowed(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_missing_allowed_folder_is_a_config_error() {
    let err = MediaFetcher::new(MediaPolicy {
        allowed_local_media_path: Some("/nonexistent/llava-media".into()),
        ..MediaPolicy::default()
    })
    .unwrap_err();
    assert!(matches!(err, MediaError::Config(_)), "{err}");
}

#[test]
fn dimensions_are_checked_from_the_header() {
    let huge = png_header(20000, 20000);
    let err = read_header(&huge, 8192 * 8192)
        .map(|h| (h.width, h.height))
        .unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooManyPixels {
                width: 20000,
                height: 20000,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "image is 20000×20000 pixels, more than the 67108864 allowed"
    );
    assert_eq!(
        read_header(&png_header(64, 32), 8192 * 8192)
            .map(|h| (h.width, h.height))
            .unwrap(),
        (64, 32)
    );

    let real = fixture("scene_336x336.png");
    assert_eq!(
        read_header(&real, 8192 * 8192)
            .map(|h| (h.width, h.height))
            .unwrap(),
        (336, 336)
    );
    assert!(matches!(
        read_header(&real, 336 * 336 - 1).map(|h| (h.width, h.height)),
        Err(MediaError::TooManyPixels { .. })
    ));

    assert!(matches!(
        read_header(b"hello world", 100).map(|h| (h.width, h.height)),
        Err(MediaError::NotAnImage)
    ));
    let bmp = b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00";
    assert!(matches!(
        read_header(bmp, 100).map(|h| (h.width, h.height)),
        Err(MediaError::UnsupportedFormat(_))
    ));
    let truncated = &real[..20];
    assert!(matches!(
        read_header(truncated, 1 << 30).map(|h| (h.width, h.height)),
        Err(MediaError::BadHeader(_))
    ));
}
