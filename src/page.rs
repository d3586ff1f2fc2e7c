//! The status page at `/` of the HTTP endpoint: plain HTML, CSS and a little
//! JavaScript, compiled into the binary (no npm, no CDN, nothing fetched from elsewhere).
//! The script reads `/status` every two seconds and renders the node, its peers and
//! their sync state, its volumes, a sync's progress and ETA, the conflict copies and the
//! last changes applied. It only reads the JSON the endpoint already serves: the page
//! shows nothing a script could not read there.
//!
//! Served on the local `--http` endpoint only (like `/status`, whose detail it shows),
//! with a Content-Security-Policy allowing this origin's own files and nothing else.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("page/index.html");
const STYLE: &str = include_str!("page/style.css");
const SCRIPT: &str = include_str!("page/app.js");

/// Scripts and styles from this origin only; `/status` is the one thing fetched.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The page's routes, added to the endpoint's router.
pub fn routes<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/page/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/page/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
