//! Slow and many clients: a connection limit per
//! listener, a header-read timeout, a request timeout that covers reading
//! the body, and `/health` answering while the API is flooded.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Host, ask};

/// Read until the peer closes (`Ok(bytes)`), or give up at `limit`.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// 300 slowloris connections against a limit of 200: the ones beyond the
/// limit are closed at once and counted, the others are closed when their
/// headers do not arrive in time, `/health` answers throughout, and the
/// API serves normally afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn slowloris_connections_are_bounded_and_timed_out() {
    let host = Host::with_config("max_connections = 200\nheader_read_timeout_ms = 1500\n");
    let addr = host.api.trim_start_matches("http://").to_string();
    let mut clients = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        // Headers that never end.
        stream
            .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        clients.push(stream);
    }
    let refused = "orchestrator_http_connections_refused_total{listener=\"api\"}";
    let open = "orchestrator_http_connections{listener=\"api\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.metric(refused).await < 100.0 {
        assert!(
            Instant::now() < deadline,
            "connections beyond the limit were not refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(host.metric(open).await <= 200.0);
    // The metrics listener is separate and answers while the API is full.
    let health = host.health().await;
    assert_eq!(health["status"], "ok", "{health}");

    // Every connection ends: at once beyond the limit, or at the header
    // timeout.
    let started = Instant::now();
    for client in &mut clients {
        let closed = read_to_close(client, Duration::from_secs(20)).await;
        assert!(closed.is_some(), "a slowloris connection stayed open");
    }
    eprintln!(
        "300 slowloris connections closed within {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.metric(open).await > 0.0 {
        assert!(Instant::now() < deadline, "open connections not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, text) = host.chat(&ask("after the flood")).await;
    assert_eq!(status, 200, "{text}");
}

/// Half-sent `/health` requests on the metrics port, reopened as they are
/// closed (as a flood of slow clients would): a probe still gets its answer,
/// because a slow client holds a slot for one second only and the
/// listener has room for far more of them than one second of such a flood.
#[tokio::test(flavor = "multi_thread")]
async fn health_answers_under_a_flood_of_half_sent_requests() {
    let host = Host::start(&[]);
    let addr = host.metrics.trim_start_matches("http://").to_string();
    // 100 half-sent requests at all times: each one the listener closes
    // (at its header timeout) is opened again.
    let flood = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut held: Vec<TcpStream> = Vec::new();
            loop {
                // Still waiting (nothing to read yet): open; anything else
                // (closed, an answer, a reset): gone.
                held.retain(|stream| {
                    let mut byte = [0u8; 1];
                    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while held.len() < 100 {
                    let Ok(mut stream) = TcpStream::connect(&addr).await else {
                        break;
                    };
                    let _ = stream
                        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                        .await;
                    held.push(stream);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Let the flood fill the listener first.
    let open = "orchestrator_http_connections{listener=\"ops\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.metric(open).await < 90.0 {
        assert!(Instant::now() < deadline, "the flood never took hold");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        let health = host.health().await;
        assert!(health["status"].is_string(), "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flood.abort();
}

/// A body shorter than its `Content-Length` is not waited for forever: the
/// client gets 408 once the request timeout passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_never_arrives_gets_408() {
    let host = Host::with_config("request_timeout_ms = 1000\n");
    let addr = host.api.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":",
        )
        .await
        .unwrap();
    let answer = read_to_close(&mut stream, Duration::from_secs(20))
        .await
        .expect("the server ends the request");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}
