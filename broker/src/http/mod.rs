//! The HTTP API, shaped like Confluent REST Proxy v2 so Kafka users recognise it.
//!
//! One file per resource (`topics`, `partitions`, `produce`, `records`, `system`) and one
//! [`error`] module that maps every failure to a status and a JSON body. Every route is registered
//! through `utoipa_actix_web`'s `service`, which also records it in the OpenAPI document served at
//! `/openapi.json`, so the document cannot forget a route (a test checks it against the server).

mod consumers;
pub mod error;
mod lenient;
mod openapi;
mod partitions;
mod produce;
mod producers;
mod records;
mod streams;
mod system;
mod topics;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::{web, App, HttpRequest};
use futures::StreamExt;
use pubg1_actors::Broker;
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;

use crate::config::Config;
use error::ApiError;

/// Everything a handler needs, shared by all workers.
#[derive(Debug)]
pub struct AppState {
    pub broker: Broker,
    pub config: Config,
    /// The OpenAPI document, rendered once by the first worker that builds the app.
    pub openapi: OnceLock<String>,
    /// Its paths (split into segments) and their methods: a request on a known path with
    /// another method gets 405 and `Allow`.
    routes: OnceLock<Vec<(Vec<String>, Vec<String>)>>,
}

impl AppState {
    /// The methods the document lists for a path matching `path`, upper case, sorted.
    fn allowed_methods(&self, path: &str) -> Vec<String> {
        let routes = self.routes.get_or_init(|| {
            let doc: serde_json::Value =
                serde_json::from_str(self.openapi.get().map_or("{}", String::as_str))
                    .unwrap_or_default();
            doc["paths"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(template, item)| {
                    let segments = template.split('/').map(str::to_owned).collect();
                    let mut methods: Vec<String> = item
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(m, _)| m.to_uppercase())
                        .collect();
                    methods.sort();
                    (segments, methods)
                })
                .collect()
        });
        let segments: Vec<&str> = path.split('/').collect();
        let mut allowed: Vec<String> = routes
            .iter()
            .filter(|(template, _)| {
                template.len() == segments.len()
                    && template.iter().zip(&segments).all(|(t, s)| {
                        t == s || (t.starts_with('{') && t.ends_with('}') && !s.is_empty())
                    })
            })
            .flat_map(|(_, methods)| methods.iter().cloned())
            .collect();
        allowed.sort();
        allowed.dedup();
        allowed
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "PubG1", description = "A durable, Kafka-shaped log over HTTP (REST Proxy v2 style)."),
    tags(
        (name = "topics", description = "Create, list, describe and delete topics"),
        (name = "records", description = "Produce and consume records"),
        (name = "consumers", description = "Consumer instances and groups (REST Proxy v2)"),
        (name = "streams", description = "Stream jobs: windowed aggregations with exactly-once results"),
        (name = "system", description = "Health, readiness, metrics, this document")
    ),
    components(schemas(EmbeddedFormat))
)]
struct ApiDoc;

/// Build the application: routes, JSON error handlers, request metrics.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let (app, openapi) = App::new()
        .into_utoipa_app()
        .openapi(ApiDoc::openapi())
        .service(system::health)
        .service(system::ready)
        .service(system::metrics)
        .service(system::openapi)
        .service(topics::list)
        .service(topics::create)
        .service(topics::describe)
        .service(topics::delete)
        .service(produce::to_topic)
        .service(produce::to_partition)
        .service(producers::init)
        .service(partitions::list)
        .service(partitions::describe)
        .service(records::fetch)
        .service(consumers::create)
        .service(consumers::delete_instance)
        .service(consumers::subscribe)
        .service(consumers::get_subscription)
        .service(consumers::unsubscribe)
        .service(consumers::assign)
        .service(consumers::assignments)
        .service(consumers::records)
        .service(consumers::commit)
        .service(consumers::get_committed)
        .service(consumers::seek)
        .service(consumers::seek_beginning)
        .service(consumers::seek_end)
        .service(consumers::list_groups)
        .service(consumers::describe_group)
        .service(partitions::barrier)
        .service(streams::create)
        .service(streams::list)
        .service(streams::describe)
        .service(streams::delete_job)
        .service(streams::windows)
        .split_for_parts();
    let limits = openapi::Limits::of(&state.config, state.broker.cluster.brokers.len());
    state
        .openapi
        .get_or_init(|| openapi::render(&openapi, limits));
    let metrics = state.broker.metrics.clone();
    app.app_data(state)
        .app_data(
            web::PathConfig::default()
                .error_handler(|err, req| path_error(&err.to_string(), req).into()),
        )
        .app_data(web::QueryConfig::default().error_handler(|err, _req| {
            ApiError::BadRequest(format!("bad query parameter: {err}")).into()
        }))
        .default_service(web::to(|req: HttpRequest, state: State| async move {
            let (method, path) = (req.method().to_string(), req.path().to_owned());
            let allowed = state.allowed_methods(&path);
            Err::<actix_web::HttpResponse, _>(if allowed.is_empty() {
                ApiError::NoRoute { method, path }
            } else {
                ApiError::MethodNotAllowed {
                    method,
                    path,
                    allow: allowed.join(", "),
                }
            })
        }))
        .wrap_fn(move |req, srv| {
            use actix_web::dev::Service;
            let started = Instant::now();
            let method = req.method().to_string();
            let metrics = metrics.clone();
            let response = srv.call(req);
            async move {
                let response = response.await?;
                let route = response
                    .request()
                    .match_pattern()
                    .unwrap_or_else(|| "unmatched".to_owned());
                let status = format!("{}xx", response.status().as_u16() / 100);
                metrics
                    .http_request_duration_seconds
                    .with_label_values(&[method.as_str(), route.as_str(), status.as_str()])
                    .observe(started.elapsed().as_secs_f64());
                Ok(response)
            }
        })
}

/// A path segment that does not parse: for `{partition}` that means no such partition.
fn path_error(message: &str, req: &HttpRequest) -> ApiError {
    let topic = req.match_info().get("topic").unwrap_or_default().to_owned();
    match req.match_info().get("partition") {
        Some(partition) if partition.parse::<u32>().is_err() => ApiError::PartitionNotFound {
            topic,
            partition: partition.to_owned(),
        },
        _ => ApiError::BadRequest(format!("bad path: {message}")),
    }
}

/// How record keys and values are embedded in JSON (REST Proxy's "embedded formats").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddedFormat {
    /// Keys and values are JSON documents, stored as their compact JSON text.
    Json,
    /// Keys and values are base64 strings, stored as the decoded bytes.
    Binary,
}

const JSON_TYPES: [&str; 3] = [
    "application/json",
    "application/vnd.kafka.json.v2+json",
    "application/vnd.kafka.v2+json",
];
const BINARY_TYPE: &str = "application/vnd.kafka.binary.v2+json";

fn media_type(value: Option<&header::HeaderValue>) -> Option<String> {
    let value = value?.to_str().ok()?;
    Some(
        value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase(),
    )
}

/// The embedded format a request body uses, from its Content-Type; 415 for anything else.
pub fn body_format(req: &HttpRequest, allow_binary: bool) -> Result<EmbeddedFormat, ApiError> {
    let accepted = if allow_binary {
        "application/json, application/vnd.kafka.json.v2+json or application/vnd.kafka.binary.v2+json"
    } else {
        "application/json or application/vnd.kafka.v2+json"
    };
    match media_type(req.headers().get(header::CONTENT_TYPE)) {
        None => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type is required: use {accepted}"
        ))),
        Some(t) if JSON_TYPES.contains(&t.as_str()) => Ok(EmbeddedFormat::Json),
        Some(t) if allow_binary && t == BINARY_TYPE => Ok(EmbeddedFormat::Binary),
        Some(t) => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{t}' is not supported: use {accepted}"
        ))),
    }
}

/// The format a consumer wants records in: `format=` wins, then the Accept header, then JSON.
pub fn response_format(req: &HttpRequest, requested: Option<EmbeddedFormat>) -> EmbeddedFormat {
    requested.unwrap_or_else(|| match media_type(req.headers().get(header::ACCEPT)) {
        Some(t) if t == BINARY_TYPE => EmbeddedFormat::Binary,
        _ => EmbeddedFormat::Json,
    })
}

/// Read a request body, refusing (413) anything over `limit` before buffering it whole.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("reading request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Parse a JSON object body, with serde's line/column message on failure.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice::<lenient::Object<T>>(body)
        .map(|object| object.0)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid: {e}")))
}

pub type State = web::Data<AppState>;

/// Shared constructor for the worker factory in `main` and the tests.
pub fn state(broker: Broker, config: Config) -> web::Data<AppState> {
    web::Data::from(Arc::new(AppState {
        broker,
        config,
        openapi: OnceLock::new(),
        routes: OnceLock::new(),
    }))
}
