//! The web console: a few static files built into the binary and served at `/console/` (`/`
//! and `/console` redirect there). It is a client of the public API like any other: the page
//! keeps the API key in the browser's session storage and sends it as `Authorization: Bearer`,
//! so the console sees exactly what the key may see. Nothing here touches the database.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

use crate::Shared;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// Every file of the console; `index.html` is the page, the rest is what it loads.
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../console/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/api.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../console/app.css"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../console/favicon.svg"),
    },
];

/// The binary's version of the files: one ETag for all, so a browser revalidates each file
/// (a cheap 304) and never runs an old script against a newer page after an upgrade.
const ETAG: &str = concat!("\"volley-console-", env!("CARGO_PKG_VERSION"), "\"");

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(to_console))
        .route("/console", web::get().to(to_console))
        .route("/console/", web::get().to(index))
        .route("/console/{file}", web::get().to(asset));
}

#[utoipa::path(
    get, path = "/", tag = "console",
    responses((status = 302, description = "Redirect to `/console/`",
        headers(("Location" = String, description = "`/console/`")))),
)]
pub(crate) async fn to_console() -> HttpResponse {
    HttpResponse::Found()
        .insert_header((header::LOCATION, "/console/"))
        .finish()
}

#[utoipa::path(
    get, path = "/console/", tag = "console",
    responses(
        (status = 200, description = "The console's page", body = String, content_type = "text/html; charset=utf-8"),
        (status = 304, description = "Not modified (`If-None-Match`)"),
    ),
)]
pub(crate) async fn index(req: HttpRequest, state: web::Data<Shared>) -> HttpResponse {
    serve(&req, &state, "index.html")
}

#[utoipa::path(
    get, path = "/console/{file}", tag = "console",
    params(("file" = String, Path, example = "app.js", description = "`index.html`, `app.js`, `api.js`, `app.css` or `favicon.svg`")),
    responses(
        (status = 200, description = "The file", content(
            (String = "text/javascript; charset=utf-8"), (String = "text/css; charset=utf-8"),
            (String = "text/html; charset=utf-8"), (String = "image/svg+xml"))),
        (status = 304, description = "Not modified (`If-None-Match`)"),
        (status = 404, description = "No such file", body = crate::error::ErrorBody),
    ),
)]
pub(crate) async fn asset(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> HttpResponse {
    serve(&req, &state, &path)
}

/// The page's Content-Security-Policy: its own scripts and styles only (no inline code, no
/// CDN), API calls to this origin, and media from this origin or the one signed links name.
fn csp(public_url: &str) -> String {
    let media = origin(public_url).unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self' data: blob: {media}; media-src 'self' blob: {media}; \
         manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// `scheme://host[:port]` of a URL, if it is an http(s) URL without characters that could
/// break out of a CSP source expression.
fn origin(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host_len = rest.find('/').unwrap_or(rest.len());
    let end = url.len() - rest.len() + host_len;
    let o = &url[..end];
    o.chars()
        .all(|c| c.is_ascii_alphanumeric() || ":/.-[]".contains(c))
        .then_some(o)
}

fn serve(req: &HttpRequest, state: &Shared, name: &str) -> HttpResponse {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return HttpResponse::NotFound().json(crate::error::ErrorBody::new(
            "not_found",
            "no such console file",
        ));
    };
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == ETAG));
    let mut resp = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    resp.insert_header((header::ETAG, ETAG))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"));
    if a.content_type.starts_with("text/html") {
        resp.insert_header((
            header::CONTENT_SECURITY_POLICY,
            csp(&state.settings.gateway.public_url),
        ))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"));
    }
    if fresh {
        return resp.finish();
    }
    resp.content_type(a.content_type).body(a.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(
            origin("http://127.0.0.1:8080"),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            origin("https://api.example.com/base/"),
            Some("https://api.example.com")
        );
        assert_eq!(origin("ftp://x"), None);
        assert_eq!(origin("https://a.com; script-src *"), None);
    }

    #[test]
    fn policy_allows_no_inline_code_or_other_hosts() {
        let p = csp("https://media.example.com/x");
        assert!(p.contains("script-src 'self';"), "{p}");
        assert!(!p.contains("unsafe"), "{p}");
        assert!(p.contains("img-src 'self' data: blob: https://media.example.com;"));
    }
}
