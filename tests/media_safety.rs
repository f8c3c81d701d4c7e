//! `MediaFetcher` against real HTTP servers on loopback: private targets refused before any request,
//! redirects checked per hop, size capped while streaming, time bounded. Nothing leaves 127.0.0.0/8.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod media_common;

use llava_server::frontend::media::{read_header, MediaError, MediaFetcher, MediaPolicy};
use media_common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn loopback_is_refused_by_default_without_contacting_it() {
    bounded(async {
        let server = image_server("127.0.0.1", fixture_png()).await;
        let fetcher = MediaFetcher::new(MediaPolicy::default()).unwrap();
        for url in [
            server.url("/img.png"),
            format!("http://localhost:{}/img.png", server.addr.port()),
        ] {
            let err = fetcher.fetch(&url).await.unwrap_err();
            assert!(
                matches!(err, MediaError::PrivateAddress(ip) if ip.is_loopback()),
                "{url}: {err}"
            );
            // What a name resolves to stays in the server's log: the message names no address.
            let message = err.to_string();
            assert!(
                message.starts_with("image URL host is a private or local address"),
                "{message}"
            );
            assert!(
                !message.contains("127.0.0.1") && !message.contains("::1"),
                "{message}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            server.connections(),
            0,
            "the refused server must see no request"
        );
    })
    .await;
}

#[tokio::test]
async fn private_hosts_download_when_allowed() {
    bounded(async {
        let png = fixture_png();
        let server = image_server("127.0.0.1", png.clone()).await;
        let fetcher = MediaFetcher::new(MediaPolicy {
            allow_private_hosts: true,
            ..MediaPolicy::default()
        })
        .unwrap();
        let bytes = fetcher.fetch(&server.url("/img.png")).await.unwrap();
        assert_eq!(bytes, png);
        assert_eq!(
            read_header(&bytes, fetcher.policy().max_pixels)
                .map(|h| (h.width, h.height))
                .unwrap(),
            (336, 336)
        );
        // Through the resolver as well.
        let by_name = format!("http://localhost:{}/img.png", server.addr.port());
        assert_eq!(fetcher.fetch(&by_name).await.unwrap(), png);
    })
    .await;
}

#[tokio::test]
async fn allowlisted_address_is_fetched_and_others_are_not() {
    bounded(async {
        let png = fixture_png();
        let allowed = image_server("127.0.0.2", png.clone()).await;
        let fetcher = MediaFetcher::new(allowlisted("127.0.0.2")).unwrap();
        assert_eq!(fetcher.fetch(&allowed.url("/a.png")).await.unwrap(), png);

        let other = image_server("127.0.0.1", png).await;
        let err = fetcher.fetch(&other.url("/a.png")).await.unwrap_err();
        assert!(matches!(err, MediaError::PrivateAddress(_)), "{err}");
        assert_eq!(other.connections(), 0);
    })
    .await;
}

#[tokio::test]
async fn redirect_to_a_private_address_is_refused_before_it_is_contacted() {
    bounded(async {
        let target = image_server("127.0.0.1", fixture_png()).await;
        let port_b = target.addr.port();
        let fetcher = MediaFetcher::new(allowlisted("127.0.0.2")).unwrap();

        // IP literal in the Location: refused by the per-hop check.
        let to_literal = redirect_server("127.0.0.2", move |_| {
            format!("http://127.0.0.1:{port_b}/img.png")
        })
        .await;
        let err = fetcher
            .fetch(&to_literal.url("/start.png"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, MediaError::PrivateAddress(ip) if ip == IpAddr::from([127, 0, 0, 1])),
            "{err}"
        );
        assert_eq!(to_literal.connections(), 1);

        // A DNS name in the Location: refused by the resolver.
        let to_name = redirect_server("127.0.0.2", move |_| {
            format!("http://localhost:{port_b}/img.png")
        })
        .await;
        let err = fetcher.fetch(&to_name.url("/start.png")).await.unwrap_err();
        assert!(
            matches!(err, MediaError::PrivateAddress(ip) if ip.is_loopback()),
            "{err}"
        );
        assert_eq!(to_name.connections(), 1);

        // Credentials and other schemes in a Location are refused too.
        let to_file = redirect_server("127.0.0.2", |_| "file:///etc/passwd".into()).await;
        let err = fetcher.fetch(&to_file.url("/x")).await.unwrap_err();
        assert!(matches!(err, MediaError::UnsupportedScheme { .. }), "{err}");
        let to_creds = redirect_server("127.0.0.2", |_| "http://u:p@127.0.0.2/".into()).await;
        let err = fetcher.fetch(&to_creds.url("/x")).await.unwrap_err();
        assert!(matches!(err, MediaError::Credentials), "{err}");

        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            target.connections(),
            0,
            "the private target must see no request"
        );
    })
    .await;
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    bounded(async {
        let png = fixture_png();
        let image = image_server("127.0.0.2", png.clone()).await;
        let image_url = image.url("/final.png");
        let hop = redirect_server("127.0.0.2", move |_| image_url.clone()).await;
        let fetcher = MediaFetcher::new(allowlisted("127.0.0.2")).unwrap();
        assert_eq!(fetcher.fetch(&hop.url("/start")).await.unwrap(), png);

        // A relative Location that always points back at itself.
        let looping = redirect_server("127.0.0.2", |path| format!("{path}x")).await;
        let err = fetcher.fetch(&looping.url("/loop")).await.unwrap_err();
        assert!(matches!(err, MediaError::TooManyRedirects(5)), "{err}");
        assert_eq!(err.to_string(), "image URL redirected more than 5 times");
        assert_eq!(looping.connections(), 6);
    })
    .await;
}

#[tokio::test]
async fn http_errors_name_the_status() {
    bounded(async {
        let server = TestServer::start("127.0.0.2", |_, stream| async move {
            respond(stream, "404 Not Found", &[], b"nope").await
        })
        .await;
        let fetcher = MediaFetcher::new(allowlisted("127.0.0.2")).unwrap();
        let err = fetcher
            .fetch(&server.url("/missing.png"))
            .await
            .unwrap_err();
        assert!(matches!(err, MediaError::HttpStatus(404)), "{err}");
        assert_eq!(err.to_string(), "image URL returned HTTP 404");
    })
    .await;
}

#[tokio::test]
async fn an_endless_body_stops_at_the_cap() {
    bounded(async {
        const TOTAL: usize = 64 << 20;
        let written = Arc::new(AtomicUsize::new(0));
        let disconnected = Arc::new(AtomicBool::new(false));
        let (w, d) = (written.clone(), disconnected.clone());
        let server = TestServer::start("127.0.0.2", move |_, mut stream| {
            let (written, disconnected) = (w.clone(), d.clone());
            async move {
                let head =
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![0x55u8; 64 * 1024];
                while written.load(Ordering::SeqCst) < TOTAL {
                    if stream.write_all(&chunk).await.is_err() {
                        disconnected.store(true, Ordering::SeqCst);
                        return;
                    }
                    written.fetch_add(chunk.len(), Ordering::SeqCst);
                }
            }
        })
        .await;
        let fetcher = MediaFetcher::new(MediaPolicy {
            max_bytes: 1 << 20,
            ..allowlisted("127.0.0.2")
        })
        .unwrap();
        let started = Instant::now();
        let err = fetcher
            .fetch(&server.url("/endless.png"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, MediaError::DownloadTooLarge(1048576)),
            "{err}"
        );
        assert_eq!(err.to_string(), "image download exceeds 1048576 bytes");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );

        // The client hung up: the server's writes fail once the socket buffers are full.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !disconnected.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            disconnected.load(Ordering::SeqCst),
            "the client should have disconnected"
        );
        let sent = written.load(Ordering::SeqCst);
        assert!(
            sent < TOTAL / 4,
            "server wrote {sent} bytes before the client hung up"
        );
    })
    .await;
}

#[tokio::test]
async fn an_announced_oversize_body_is_refused_early() {
    bounded(async {
        let server = TestServer::start("127.0.0.2", |_, mut stream| async move {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 104857600\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&[0u8; 1024]).await;
            // Then stall: only the header can have caused the refusal.
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let fetcher = MediaFetcher::new(MediaPolicy {
            max_bytes: 1 << 20,
            total_timeout: Duration::from_secs(10),
            ..allowlisted("127.0.0.2")
        })
        .unwrap();
        let started = Instant::now();
        let err = fetcher.fetch(&server.url("/big.png")).await.unwrap_err();
        assert!(
            matches!(err, MediaError::DownloadTooLarge(1048576)),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn a_pixel_bomb_header_is_refused_before_decoding() {
    bounded(async {
        let bomb = png_header(20000, 20000);
        let server = image_server("127.0.0.2", bomb.clone()).await;
        let fetcher = MediaFetcher::new(allowlisted("127.0.0.2")).unwrap();
        let bytes = fetcher.fetch(&server.url("/bomb.png")).await.unwrap();
        assert_eq!(bytes, bomb);
        let err = read_header(&bytes, fetcher.policy().max_pixels)
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
    })
    .await;
}

#[tokio::test]
async fn a_silent_server_hits_the_total_timeout() {
    bounded(async {
        // Accepts and reads the request, never answers.
        let silent = TestServer::start("127.0.0.2", |_, stream| async move {
            let _open = stream;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        // Sends the headers, then stalls mid-body: the total limit covers the body too.
        let stalling = TestServer::start("127.0.0.2", |_, mut stream| async move {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&[0u8; 10]).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let fetcher = MediaFetcher::new(MediaPolicy {
            total_timeout: Duration::from_millis(500),
            ..allowlisted("127.0.0.2")
        })
        .unwrap();
        for url in [silent.url("/slow.png"), stalling.url("/slow.png")] {
            let started = Instant::now();
            let err = fetcher.fetch(&url).await.unwrap_err();
            let elapsed = started.elapsed();
            assert!(matches!(err, MediaError::Timeout(_)), "{url}: {err}");
            assert!(err.to_string().starts_with("image URL timed out"), "{err}");
            assert!(
                elapsed >= Duration::from_millis(400),
                "{url}: gave up after {elapsed:?}"
            );
            assert!(elapsed < Duration::from_secs(3), "{url}: took {elapsed:?}");
        }
    })
    .await;
}
