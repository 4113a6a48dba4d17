//! Reading a storable body: the whole identity body kept for the entry (up to
//! `cache.max_entry_bytes`, in one allocation of exactly its size), every frame forwarded to a waiting client as it comes, a slow
//! client never slowing the copy.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::ProxyError;
use crate::http::body::{self, Body};
use crate::upstream::UpstreamError;

/// How reading a storable body ended.
#[derive(Debug)]
pub enum Copied {
    /// The whole identity body.
    Whole(Bytes),
    /// Over `max_entry_bytes`: not kept (the client, if any, got all of it).
    TooLarge,
}

/// Reads `body` to its end, keeping a copy of up to `max` bytes and forwarding every frame to
/// `client` while it listens (a client that goes away does not stop the copy: the entry is
/// still wanted). `too_large` runs once, as soon as the body passes `max`.
///
/// A slow client does not slow the copy down: frames it has no room for wait in a backlog of
/// up to `max` bytes (they are the same `Bytes` as the copy, not duplicates), and what is left
/// when the replica is done is handed over by a task of its own. Only a client that falls
/// further behind than that makes the copy wait (bounded by the listener's send timeout).
pub async fn copy(
    mut body: Body,
    client: Option<body::Sender>,
    max: usize,
    too_large: impl FnOnce(),
) -> Result<Copied, ProxyError> {
    // Frames are slices of the replica connection's read buffer: each is copied out as it
    // comes (holding them until the end would hold those buffers, for every fill at once),
    // into one allocation of the announced length when there is one.
    let announced = http_body::Body::size_hint(&body)
        .exact()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= max);
    let mut kept = Some(BytesMut::with_capacity(announced.unwrap_or(0)));
    let mut too_large = Some(too_large);
    let mut out = Forward::new(client, max);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let message = e.to_string();
                out.fail(e).await;
                return Err(ProxyError::Upstream(UpstreamError::Body(message)));
            }
        };
        if let (Some(whole), Some(data)) = (kept.as_mut(), frame.data_ref()) {
            if whole.len() + data.len() > max {
                kept = None;
                if let Some(f) = too_large.take() {
                    f();
                }
            } else {
                whole.extend_from_slice(data);
            }
        }
        out.push(frame).await;
    }
    out.finish();
    Ok(match kept {
        // The copy is kept (in the L1, as the entry's identity body): it owns exactly its
        // bytes, not the spare capacity a body of unannounced length grew.
        Some(whole) if whole.capacity() - whole.len() > whole.len() / 8 => {
            Copied::Whole(Bytes::copy_from_slice(&whole))
        }
        Some(whole) => Copied::Whole(whole.freeze()),
        None => Copied::TooLarge,
    })
}

/// The client side of [`copy`]: frames go to the client as fast as it takes them, the rest
/// waits in a bounded backlog.
struct Forward {
    tx: Option<body::Sender>,
    backlog: std::collections::VecDeque<http_body::Frame<Bytes>>,
    backlog_bytes: usize,
    max_backlog: usize,
}

impl Forward {
    fn new(tx: Option<body::Sender>, max_backlog: usize) -> Forward {
        Forward {
            tx,
            backlog: std::collections::VecDeque::new(),
            backlog_bytes: 0,
            max_backlog,
        }
    }

    fn size(frame: &http_body::Frame<Bytes>) -> usize {
        frame.data_ref().map_or(0, Bytes::len)
    }

    /// Moves backlog frames to the client while it has room; `false` when it went away.
    fn drain_ready(&mut self) -> bool {
        let Some(tx) = &self.tx else { return false };
        while let Some(frame) = self.backlog.pop_front() {
            let n = Forward::size(&frame);
            match tx.try_send(Ok(frame)) {
                Ok(()) => self.backlog_bytes -= n,
                Err(tokio::sync::mpsc::error::TrySendError::Full(Ok(frame))) => {
                    self.backlog.push_front(frame);
                    return true;
                }
                Err(_) => {
                    self.tx = None;
                    self.backlog.clear();
                    self.backlog_bytes = 0;
                    return false;
                }
            }
        }
        true
    }

    async fn push(&mut self, frame: http_body::Frame<Bytes>) {
        if self.tx.is_none() {
            return;
        }
        self.backlog_bytes += Forward::size(&frame);
        self.backlog.push_back(frame);
        if !self.drain_ready() {
            return;
        }
        // Far behind: wait for the client (its send timeout bounds this).
        while self.backlog_bytes > self.max_backlog {
            let (Some(tx), Some(frame)) = (&self.tx, self.backlog.pop_front()) else {
                return;
            };
            self.backlog_bytes -= Forward::size(&frame);
            if tx.send(Ok(frame)).await.is_err() {
                self.tx = None;
                self.backlog.clear();
                self.backlog_bytes = 0;
            }
        }
    }

    async fn fail(&mut self, e: body::BoxError) {
        if let Some(tx) = self.tx.take() {
            for frame in self.backlog.drain(..) {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Err(e)).await;
        }
    }

    /// Hands what is left to the client in the background.
    fn finish(mut self) {
        if !self.drain_ready() || self.backlog.is_empty() {
            return;
        }
        let (Some(tx), backlog) = (self.tx.take(), std::mem::take(&mut self.backlog)) else {
            return;
        };
        tokio::spawn(async move {
            for frame in backlog {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
    }
}
