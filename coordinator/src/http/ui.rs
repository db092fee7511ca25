//! `/ui`: the web dashboard, three hand-written files compiled into the binary (no
//! build step, nothing fetched from elsewhere), served by every coordinator.
//!
//! The page itself is static and needs no token; it asks for one and sends it with
//! every `/v1/*` call it makes (never in a URL). Each asset is served with its content
//! type, `Cache-Control: no-cache` and an `ETag` (a SHA-256 of its bytes, computed once)
//! so a browser revalidates with `If-None-Match` and gets `304` until the binary
//! changes, and with a strict [`CSP`]: the page runs only its own script and style and
//! talks only to its own origin.

use std::sync::LazyLock;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// The `Content-Security-Policy` of every asset.
pub(super) const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// One compiled-in file.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    /// `"<first 16 bytes of the body's SHA-256, hex>"`.
    etag: HeaderValue,
}

impl Asset {
    fn new(body: &'static [u8], content_type: &'static str) -> Asset {
        let digest = ring::digest::digest(&ring::digest::SHA256, body);
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
        Asset {
            body,
            content_type,
            etag,
        }
    }

    /// The asset, or `304 Not Modified` when the client holds this version.
    fn serve(&self, req: &HeaderMap) -> Response {
        let fresh = req
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t.as_bytes() == self.etag.as_bytes());
        let mut resp = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            let mut r = self.body.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            );
            r
        };
        let h = resp.headers_mut();
        h.insert(header::ETAG, self.etag.clone());
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        );
        resp
    }
}

static INDEX: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_bytes!("ui/index.html"), "text/html; charset=utf-8"));
static APP_JS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_bytes!("ui/app.js"),
        "text/javascript; charset=utf-8",
    )
});
static APP_CSS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_bytes!("ui/app.css"), "text/css; charset=utf-8"));

async fn index(req: HeaderMap) -> Response {
    INDEX.serve(&req)
}

async fn app_js(req: HeaderMap) -> Response {
    APP_JS.serve(&req)
}

async fn app_css(req: HeaderMap) -> Response {
    APP_CSS.serve(&req)
}

/// `/ui` to `/ui/`, relative so that it holds behind a proxy that adds a path prefix.
async fn to_index() -> Redirect {
    Redirect::permanent("ui/")
}

/// The dashboard's routes, outside `/v1` and without a token: `GET /ui` (a redirect to
/// `/ui/`), `/ui/`, `/ui/app.js`, `/ui/app.css` (`HEAD` too). Merge into the router.
pub(super) fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/ui", get(to_index))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    async fn call(path: &str, etag: Option<&HeaderValue>) -> Response {
        let mut req = Request::get(path);
        if let Some(e) = etag {
            req = req.header(header::IF_NONE_MATCH, e);
        }
        routes::<()>()
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn assets_have_types_etags_and_policy() {
        for (path, ty) in [
            ("/ui/", "text/html; charset=utf-8"),
            ("/ui/app.js", "text/javascript; charset=utf-8"),
            ("/ui/app.css", "text/css; charset=utf-8"),
        ] {
            let r = call(path, None).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], ty, "{path}");
            assert_eq!(h[header::CACHE_CONTROL], "no-cache", "{path}");
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
            let etag = h[header::ETAG].clone();
            assert!(etag.to_str().expect("ascii").len() == 34, "{etag:?}");
            // The same version again: 304, no body.
            let again = call(path, Some(&etag)).await;
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
            assert_eq!(again.headers()[header::ETAG], etag);
            let body = axum::body::to_bytes(again.into_body(), 1 << 20)
                .await
                .expect("body");
            assert!(body.is_empty());
            // Another version: the asset.
            let other = HeaderValue::from_static("\"stale\"");
            assert_eq!(call(path, Some(&other)).await.status(), StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn bare_ui_redirects_to_the_index() {
        let r = call("/ui", None).await;
        assert!(r.status().is_redirection());
        assert_eq!(r.headers()[header::LOCATION], "ui/");
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        let html = std::str::from_utf8(INDEX.body).expect("utf-8");
        assert!(html.contains(r#"src="app.js""#) && html.contains(r#"href="app.css""#));
        // Nothing the policy would refuse: no inline script or style, no other origin.
        for bad in [
            "<style", "style=", "onclick", "http://", "https://", "<script>",
        ] {
            assert!(!html.contains(bad), "index.html contains {bad:?}");
        }
        let js = std::str::from_utf8(APP_JS.body).expect("utf-8");
        assert!(!js.contains("innerHTML"), "app.js must not use innerHTML");
        assert!(!js.contains("eval("), "app.js must not eval");
    }
}
