//! A small blocking HTTP client: every status comes back as a [`Reply`], never as an error.

use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

/// How long metadata (leaders, convergence) may take to settle.
pub(crate) const SETTLE_DEADLINE: Duration = Duration::from_secs(60);

/// A partition as `url` describes it (leader, watermarks), if it answers 200.
pub(crate) fn describe(http: &Http, url: &str, topic: &str, partition: u32) -> Option<Value> {
    http.get(&format!("{url}/topics/{topic}/partitions/{partition}"))
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.body)
}

#[derive(Debug, Clone)]
pub struct Http {
    agent: ureq::Agent,
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
    /// The `Location` header of a redirect.
    pub location: Option<String>,
}

impl Http {
    /// A client whose requests give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            // Redirects are answers to act on (a group's coordinator is elsewhere), not to
            // follow blindly: a POST must not turn into a GET.
            .max_redirects(0)
            .build();
        Self {
            agent: config.into(),
        }
    }

    pub fn get(&self, url: &str) -> Result<Reply> {
        read(self.agent.get(url).call())
    }

    pub fn delete(&self, url: &str) -> Result<Reply> {
        read(self.agent.delete(url).call())
    }

    /// A GET answered as (status, body text).
    pub fn get_raw(&self, url: &str) -> Result<(u16, String)> {
        read_raw(self.agent.get(url).call())
    }

    /// A POST answered as (status, body text).
    pub fn post_raw(&self, url: &str, content_type: &str, body: &[u8]) -> Result<(u16, String)> {
        read_raw(
            self.agent
                .post(url)
                .header("Content-Type", content_type)
                .send(body),
        )
    }

    pub fn post(&self, url: &str, content_type: &str, body: &str) -> Result<Reply> {
        read(
            self.agent
                .post(url)
                .header("Content-Type", content_type)
                .send(body.as_bytes()),
        )
    }
}

/// Status and body text of a response (the hot paths parse their own bodies).
fn read_raw(
    result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(u16, String)> {
    let mut response = result?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(512 * 1024 * 1024)
        .read_to_string()?;
    Ok((status, text))
}

fn read(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Reply> {
    let mut response = result?;
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response
        .body_mut()
        .with_config()
        .limit(512 * 1024 * 1024)
        .read_to_string()?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        body,
        text,
        location,
    })
}
