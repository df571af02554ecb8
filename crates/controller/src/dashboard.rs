//! The dashboard: a page at `/` that draws the matrix live — machines, their instances, load
//! against capacity, the event feed — and offers the operator's actions. The page, its script
//! and its style are embedded in the binary (no build step); they hold no data. Everything they
//! show comes from `GET /api/v1/stream`, server-sent events carrying a [`DashboardSnapshot`]
//! once a second, and every action is an ordinary API call — both with the operator's token,
//! which the page keeps for the browser session and sends as a header, never in a URL.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::Stream;
use vmatrix_core::api::{DashboardSnapshot, Event};

use crate::api::Ctx;

/// How often the stream sends the matrix.
const EVERY: Duration = Duration::from_secs(1);
/// Events the first message carries.
const FIRST_EVENTS: usize = 200;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// The page and its assets (no token: they hold no data).
pub(crate) fn assets() -> Router<Ctx> {
    let page = |body: &'static str, kind: &'static str| {
        move || async move {
            (
                [
                    ("content-type", kind),
                    // The page runs only its own script and talks only to this controller.
                    (
                        "content-security-policy",
                        "default-src 'self'; img-src 'self' data:; style-src 'self'; \
                         script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                    ),
                    ("x-content-type-options", "nosniff"),
                    ("cache-control", "no-cache"),
                ],
                body,
            )
                .into_response()
        }
    };
    Router::new()
        .route("/", get(page(PAGE, "text/html; charset=utf-8")))
        .route(
            "/dashboard/app.js",
            get(page(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/dashboard/app.css",
            get(page(STYLE, "text/css; charset=utf-8")),
        )
}

/// What the stream remembers between messages.
struct Cursor {
    ctx: Ctx,
    /// The last event sent.
    last_event: Option<u64>,
    first: bool,
}

/// `GET /api/v1/stream`: the matrix once a second, as server-sent events (`snapshot`, or
/// `error` with a message when the controller cannot say).
pub(crate) async fn stream(
    State(ctx): State<Ctx>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let cursor = Cursor {
        ctx,
        last_event: None,
        first: true,
    };
    let messages = futures::stream::unfold(cursor, |mut cur| async move {
        if !cur.first {
            tokio::time::sleep(EVERY).await;
        }
        cur.first = false;
        let message = match snapshot(&mut cur) {
            Ok(s) => SseEvent::default()
                .event("snapshot")
                .json_data(&s)
                .unwrap_or_else(|e| SseEvent::default().event("error").data(e.to_string())),
            Err(e) => SseEvent::default().event("error").data(e),
        };
        Some((Ok(message), cur))
    });
    Sse::new(messages).keep_alive(KeepAlive::default())
}

fn snapshot(cur: &mut Cursor) -> Result<DashboardSnapshot, String> {
    let c = &cur.ctx.c;
    let events: Vec<Event> = match cur.last_event {
        Some(after) => c.events(after, 1000).map_err(|e| e.to_string())?,
        None => {
            let all = c.events(0, 10_000).map_err(|e| e.to_string())?;
            let skip = all.len().saturating_sub(FIRST_EVENTS);
            all.into_iter().skip(skip).collect()
        }
    };
    if let Some(last) = events.last() {
        cur.last_event = Some(last.id);
    } else if cur.last_event.is_none() {
        cur.last_event = Some(0);
    }
    Ok(DashboardSnapshot {
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        machines: crate::api::machines_reply(c).map_err(|e| e.to_string())?,
        instances: c.instances().map_err(|e| e.to_string())?,
        services: crate::api::services_reply(c).map_err(|e| e.to_string())?,
        load: c.load(),
        events,
        usage: c.instance_usage(),
    })
}
