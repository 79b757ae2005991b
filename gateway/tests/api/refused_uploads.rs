//! Uploads refused before their body is read still reach the client as 4xx
//! JSON, whatever the client's order of sending and reading: curl and
//! reqwest read while they send, so they see an early answer even when the
//! server resets the connection afterwards; Python's httpx and other
//! blocking clients write the whole body first, and a reset under them turns
//! the answer into a connection error.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::{TestApp, token_for};

/// Writes the whole request, then reads the answer, as a blocking client
/// does. The answer's status and JSON body, or the I/O error the client saw.
async fn send_whole_then_read(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    chunked: bool,
) -> std::io::Result<(u16, Value)> {
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if chunked {
        head.push_str("transfer-encoding: chunked\r\n\r\n");
    } else {
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    }
    socket.write_all(head.as_bytes()).await?;
    if chunked {
        for chunk in body.chunks(64 * 1024) {
            socket
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            socket.write_all(chunk).await?;
            socket.write_all(b"\r\n").await?;
        }
        socket.write_all(b"0\r\n\r\n").await?;
    } else {
        socket.write_all(body).await?;
    }
    socket.flush().await?;
    // Only now read: status line, headers, then content-length bytes.
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let header_end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = socket.read(&mut buffer).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        received.extend_from_slice(&buffer[..n]);
    };
    let head = String::from_utf8_lossy(&received[..header_end]).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().expect("a status code");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    while received.len() < header_end + length {
        let n = socket.read(&mut buffer).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        received.extend_from_slice(&buffer[..n]);
    }
    let json =
        serde_json::from_slice(&received[header_end..header_end + length]).expect("a JSON body");
    Ok((status, json))
}

/// A JPEG's first bytes followed by `len` bytes of noise: refused by its
/// declared type or size long before its content matters.
fn jpeg_like(len: usize) -> Vec<u8> {
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0];
    bytes.extend((0..len).map(|i| (i * 7 % 251) as u8));
    bytes
}

#[tokio::test]
async fn refused_uploads_reach_clients_that_send_the_whole_body_before_reading() {
    let app = TestApp::start(crate::answer()).await;
    let token = format!("Bearer {}", token_for("alice", 3600));
    let one_mb = jpeg_like(1_100_000);
    let huge = jpeg_like(25 * 1024 * 1024);
    let multipart = "multipart/form-data; boundary=b".to_owned();
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, &str, Vec<(&str, String)>, &[u8], bool, u16, &str)> = vec![
        (
            "1 MB JPEG sent as text/plain",
            "/v1/scans",
            vec![
                ("authorization", token.clone()),
                ("content-type", "text/plain".into()),
            ],
            &one_mb,
            false,
            415,
            "unsupported_media_type",
        ),
        (
            "25 MB declared",
            "/v1/scans",
            vec![
                ("authorization", token.clone()),
                ("content-type", "image/jpeg".into()),
            ],
            &huge,
            false,
            413,
            "too_large",
        ),
        (
            "25 MB multipart declared",
            "/v1/scans",
            vec![
                ("authorization", token.clone()),
                ("content-type", multipart.clone()),
            ],
            &huge,
            false,
            413,
            "too_large",
        ),
        (
            "25 MB chunked, refused once 20 MB are read",
            "/v1/scans",
            vec![
                ("authorization", token.clone()),
                ("content-type", "image/jpeg".into()),
            ],
            &huge,
            true,
            413,
            "too_large",
        ),
        (
            "1 MB without a token",
            "/v1/scans",
            vec![("content-type", "image/jpeg".into())],
            &one_mb,
            false,
            401,
            "missing_token",
        ),
        (
            "1 MB with a bad lang",
            "/v1/scans?lang=fr",
            vec![
                ("authorization", token.clone()),
                ("content-type", "image/jpeg".into()),
            ],
            &one_mb,
            false,
            400,
            "invalid_lang",
        ),
    ];
    for (what, path, headers, body, chunked, status, code) in &cases {
        for attempt in 0..3 {
            let answer = tokio::time::timeout(
                Duration::from_secs(60),
                send_whole_then_read(app.addr, path, headers, body, *chunked),
            )
            .await
            .unwrap_or_else(|_| panic!("{what} (attempt {attempt}): no answer within 60 s"));
            let (got, json) =
                answer.unwrap_or_else(|e| panic!("{what} (attempt {attempt}): the client saw {e}"));
            assert_eq!(got, *status, "{what}: {json}");
            assert_eq!(json["error"]["code"], *code, "{what}: {json}");
        }
        // reqwest sends the same body whole (no Expect: 100-continue).
        let mut request = app.http.post(app.url(path)).body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), *status, "{what} via reqwest");
        let json: Value = response.json().await.unwrap();
        assert_eq!(json["error"]["code"], *code, "{what} via reqwest: {json}");
    }

    // A client that asks to continue sends nothing until told to: it gets
    // the refusal as the first answer (no `100 Continue` before it).
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /v1/scans HTTP/1.1\r\nhost: {}\r\nauthorization: {token}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        app.addr,
        one_mb.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut answer))
        .await
        .expect("an answer without sending the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");

    // Nothing reached the bus.
    use futures::StreamExt as _;
    let js = app.js().await;
    let mut requests = js.get_stream(bus::streams::SCAN_REQ).await.unwrap();
    assert_eq!(requests.info().await.unwrap().state.messages, 0);
    let images = js
        .get_object_store(bus::streams::OBJ_SCAN_IMAGES)
        .await
        .unwrap();
    assert_eq!(images.list().await.unwrap().count().await, 0);
    let owners = js.get_key_value(bus::streams::KV_SCANS).await.unwrap();
    assert_eq!(owners.keys().await.unwrap().count().await, 0);
}
