//! Who may call what. `/v1/*` (and `/metrics` when asked) requires `Authorization:
//! Bearer <token>` — the cluster's bootstrap token (`admin`) or a token made with
//! `POST /v1/tokens` — or a coordinator certificate presented over HTTPS.
//!
//! Each route needs a [`Scope`], written once in [`RULES`]; a route missing from the
//! table needs `admin` (deny by default). [`ENROLL`] alone takes the enrollment token
//! instead, which opens nothing else. A token limited to swarms may use the routes
//! whose handlers check the swarm ([`Swarms::Checked`]) and the cluster-wide health
//! views ([`Swarms::Any`]), not the rest. The request's [`Principal`] goes into its
//! extensions for the handlers.
//!
//! A follower authenticates the client, then forwards over HTTPS with its own
//! certificate and the principal in [`PRINCIPAL`]; the leader believes that header only
//! from a coordinator's certificate.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use swarm_proto::api::Scope;

use super::listen::PeerCert;
use super::ApiError;
use crate::access::{self, Principal};
use crate::node::Node;

/// Header carrying the principal of a forwarded request (believed only from a
/// coordinator's certificate).
pub const PRINCIPAL: &str = "x-swarm-principal";

/// The route new workers enroll on: authorized by the enrollment token alone, outside
/// [`RULES`].
pub const ENROLL: &str = "/v1/certs/enroll";

/// What a route does with a token limited to swarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swarms {
    /// The handler checks the swarm of what it touches, or filters by it.
    Checked,
    /// Nothing per swarm: cluster health views, open to every token of the scope.
    Any,
    /// Cluster-wide data or changes: needs a token not limited to swarms.
    Unlimited,
}

/// One route's requirement.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub method: &'static str,
    /// As routed (`{id}` for parameters).
    pub path: &'static str,
    pub scope: Scope,
    pub swarms: Swarms,
}

const fn rule(method: &'static str, path: &'static str, scope: Scope, swarms: Swarms) -> Rule {
    Rule {
        method,
        path,
        scope,
        swarms,
    }
}

use Scope::{Admin, Operate, Read, Submit};
use Swarms::{Any, Checked, Unlimited};

/// Every authenticated route and what it needs.
pub const RULES: &[Rule] = &[
    rule("GET", "/v1/tasks", Read, Checked),
    rule("POST", "/v1/tasks", Submit, Checked),
    rule("POST", "/v1/tasks/batch", Submit, Checked),
    rule("POST", "/v1/graphs", Submit, Checked),
    rule("GET", "/v1/tasks/{id}", Read, Checked),
    rule("POST", "/v1/tasks/{id}/cancel", Operate, Checked),
    rule("POST", "/v1/tasks/{id}/retry", Operate, Checked),
    rule("POST", "/v1/tasks/{id}/approve", Operate, Checked),
    rule("POST", "/v1/tasks/{id}/reject", Operate, Checked),
    rule("POST", "/v1/tasks/retry", Operate, Checked),
    rule("GET", "/v1/tasks/{id}/events", Read, Checked),
    rule("GET", "/v1/tasks/{id}/logs", Read, Checked),
    rule("GET", "/v1/swarms", Read, Checked),
    rule("POST", "/v1/swarms", Operate, Checked),
    rule("GET", "/v1/swarms/{name}", Read, Checked),
    rule("PUT", "/v1/swarms/{name}/budget", Operate, Checked),
    rule("GET", "/v1/usage", Read, Checked),
    rule("DELETE", "/v1/swarms/{name}", Operate, Checked),
    // A schedule is a standing order that submits for as long as it lives: defining,
    // pausing and deleting one is an operator's act, like defining a swarm.
    rule("GET", "/v1/schedules", Read, Checked),
    rule("POST", "/v1/schedules", Operate, Checked),
    rule("GET", "/v1/schedules/{name}", Read, Checked),
    rule("DELETE", "/v1/schedules/{name}", Operate, Checked),
    rule("POST", "/v1/schedules/{name}/pause", Operate, Checked),
    rule("POST", "/v1/schedules/{name}/resume", Operate, Checked),
    rule("GET", "/v1/limits", Read, Unlimited),
    rule("GET", "/v1/limits/{name}", Read, Unlimited),
    rule("PUT", "/v1/limits/{name}", Operate, Unlimited),
    rule("DELETE", "/v1/limits/{name}", Operate, Unlimited),
    rule("GET", "/v1/status", Read, Any),
    rule("GET", "/v1/events", Read, Checked),
    rule("GET", "/v1/whoami", Read, Any),
    rule("GET", "/v1/node", Read, Any),
    rule("GET", "/v1/cluster", Read, Any),
    rule("GET", "/v1/workers", Read, Unlimited),
    rule("POST", "/v1/workers/{id}/drain", Operate, Unlimited),
    rule("POST", "/v1/workers/{id}/resume", Operate, Unlimited),
    rule("GET", "/v1/memory", Read, Unlimited),
    rule("GET", "/v1/memory/{collection}", Read, Unlimited),
    rule("PUT", "/v1/memory/{collection}", Operate, Unlimited),
    rule("DELETE", "/v1/memory/{collection}", Operate, Unlimited),
    rule("POST", "/v1/memory/{collection}/points", Operate, Unlimited),
    rule("POST", "/v1/memory/{collection}/delete", Operate, Unlimited),
    rule("POST", "/v1/memory/{collection}/search", Read, Unlimited),
    rule("GET", "/v1/patterns", Read, Unlimited),
    rule("POST", "/v1/patterns", Operate, Unlimited),
    rule("POST", "/v1/patterns/retrieve", Read, Unlimited),
    rule("POST", "/v1/patterns/judge", Operate, Unlimited),
    rule("POST", "/v1/patterns/consolidate", Operate, Unlimited),
    rule("POST", "/v1/cluster/nodes", Admin, Unlimited),
    rule("DELETE", "/v1/cluster/nodes/{id}", Admin, Unlimited),
    rule("GET", "/v1/backup", Admin, Unlimited),
    rule("POST", "/v1/restore", Admin, Unlimited),
    rule("GET", "/v1/tokens", Admin, Unlimited),
    rule("POST", "/v1/tokens", Admin, Unlimited),
    rule("DELETE", "/v1/tokens/{token}", Admin, Unlimited),
    rule("GET", "/v1/certs/revoked", Admin, Unlimited),
    rule("POST", "/v1/certs/revoked", Admin, Unlimited),
    rule("GET", "/metrics", Read, Unlimited),
];

/// What `method path` (as routed) needs; unknown routes need `admin`.
pub fn rule_for(method: &Method, path: &str) -> Rule {
    RULES
        .iter()
        .find(|r| r.path == path && r.method == method.as_str())
        .copied()
        .unwrap_or(Rule {
            method: "",
            path: "",
            scope: Admin,
            swarms: Unlimited,
        })
}

/// Middleware: `401 unauthorized` (with `WWW-Authenticate: Bearer`) without valid
/// credentials, `403 forbidden` naming the scope or swarm a valid token lacks; else
/// the request runs with its [`Principal`] in the extensions.
pub(super) async fn require_token(
    State(node): State<Arc<Node>>,
    mut req: Request,
    next: Next,
) -> Response {
    let matched = req.extensions().get::<MatchedPath>().map(|m| m.as_str());
    if matched == Some(ENROLL) {
        // The enrollment token, and nothing else, signs up new workers; a follower
        // checks it before forwarding under its own certificate.
        if !from_coordinator(&req) {
            let given = bearer(&req).unwrap_or_default();
            if let Err(e) = access::check_enroll_token(&node, given) {
                return ApiError::from(e).into_response();
            }
        }
        return next.run(req).await;
    }
    let principal = match principal_of(&node, &req) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    // No matched route: the request ends in `404` (or `405`) and touches nothing.
    let Some(path) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
    else {
        req.extensions_mut().insert(principal);
        return next.run(req).await;
    };
    let rule = rule_for(req.method(), &path);
    if !principal.scope.allows(rule.scope) {
        return ApiError::Forbidden(format!(
            "token {:?} has scope {}; {} {path} needs scope {}",
            principal.name,
            principal.scope,
            req.method(),
            rule.scope
        ))
        .into_response();
    }
    if rule.swarms == Unlimited {
        if let Some(swarms) = &principal.swarms {
            return ApiError::Forbidden(format!(
                "token {:?} is limited to swarms {}; {} {path} is cluster-wide and needs a \
                 token not limited to swarms",
                principal.name,
                swarms.join(", "),
                req.method()
            ))
            .into_response();
        }
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Whether the request came over HTTPS with a coordinator's certificate.
fn from_coordinator(req: &Request) -> bool {
    req.extensions()
        .get::<PeerCert>()
        .is_some_and(|p| p.0.role == swarm_transport::Role::Coordinator)
}

/// The bearer token of `req`, if any.
fn bearer(req: &Request) -> Option<&[u8]> {
    req.headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b""))
}

fn principal_of(node: &Node, req: &Request) -> Result<Principal, ApiError> {
    if from_coordinator(req) {
        // A peer coordinator: a request it forwards carries its client's principal.
        return Ok(match req.headers().get(PRINCIPAL) {
            Some(v) => decode(v).ok_or(ApiError::BadRequest(format!(
                "malformed {PRINCIPAL} header from a coordinator"
            )))?,
            None => Principal::admin("coordinator"),
        });
    }
    let Some(given) = bearer(req) else {
        return Err(ApiError::Unauthorized(
            "missing bearer token (Authorization: Bearer <token>)",
        ));
    };
    access::authenticate(node, given).ok_or(ApiError::Unauthorized(
        "invalid, revoked or expired bearer token",
    ))
}

/// `403` unless `p` may act on swarm `swarm` (an empty name is the default swarm).
pub(super) fn check_swarm(p: &Principal, swarm: &str) -> Result<(), ApiError> {
    let swarm = if swarm.is_empty() {
        swarm_topology::DEFAULT_SWARM_NAME
    } else {
        swarm
    };
    match p.may_use_swarm(swarm) {
        true => Ok(()),
        false => Err(ApiError::Forbidden(format!(
            "token {:?} is limited to swarms {}, not {swarm:?}",
            p.name,
            p.swarms.as_deref().unwrap_or_default().join(", ")
        ))),
    }
}

/// The [`PRINCIPAL`] header value for `p`: `scope;name;swarm,swarm`.
pub(super) fn encode(p: &Principal) -> Option<HeaderValue> {
    let swarms = p.swarms.as_ref().map(|s| s.join(",")).unwrap_or_default();
    let all = if p.swarms.is_some() { "" } else { "*" };
    HeaderValue::from_str(&format!("{};{};{all}{swarms}", p.scope, p.name)).ok()
}

fn decode(v: &HeaderValue) -> Option<Principal> {
    let text = v.to_str().ok()?;
    let mut parts = text.splitn(3, ';');
    let scope = Scope::parse(parts.next()?)?;
    let name = parts.next()?.to_string();
    let swarms = parts.next()?;
    let swarms = match swarms {
        "*" => None,
        s => Some(
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect(),
        ),
    };
    Some(Principal {
        name,
        scope,
        swarms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_cross_the_forward_intact() {
        for p in [
            Principal::admin("bootstrap"),
            Principal {
                name: "ci".into(),
                scope: Scope::Submit,
                swarms: Some(vec!["a".into(), "b-2".into()]),
            },
        ] {
            assert_eq!(decode(&encode(&p).unwrap()), Some(p));
        }
        assert_eq!(decode(&HeaderValue::from_static("root;x;*")), None);
    }

    #[test]
    fn unknown_routes_need_admin() {
        assert_eq!(rule_for(&Method::GET, "/v1/nothing").scope, Scope::Admin);
        assert_eq!(rule_for(&Method::PATCH, "/v1/tasks").scope, Scope::Admin);
    }
}
