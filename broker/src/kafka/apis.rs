//! Which APIs and versions the listener serves: exactly what is implemented and tested, and
//! what ApiVersions advertises.

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};
use kafka_protocol::ResponseError;

/// (API, lowest version, highest version) served.
pub const SERVED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 5),
    (ApiKey::DeleteTopics, 1, 4),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::DescribeCluster, 0, 1),
];

pub fn supports(api: ApiKey, version: i16) -> bool {
    SERVED
        .iter()
        .any(|(served, min, max)| *served == api && (*min..=*max).contains(&version))
}

/// The ApiVersions answer.
pub fn versions() -> ApiVersionsResponse {
    ApiVersionsResponse::default().with_api_keys(
        SERVED
            .iter()
            .map(|(api, min, max)| {
                ApiVersion::default()
                    .with_api_key(*api as i16)
                    .with_min_version(*min)
                    .with_max_version(*max)
            })
            .collect(),
    )
}

/// The answer to an ApiVersions request of a version we do not know (KIP-511).
pub fn unsupported_version() -> ApiVersionsResponse {
    versions().with_error_code(ResponseError::UnsupportedVersion.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_version_is_one_the_codec_knows() {
        for (api, min, max) in SERVED {
            let known = api.valid_versions();
            assert!(
                known.min <= *min && *max <= known.max,
                "{api:?} {min}..={max} outside {known:?}"
            );
        }
        assert!(supports(ApiKey::Fetch, 12) && !supports(ApiKey::Fetch, 13));
        assert!(supports(ApiKey::JoinGroup, 0) && !supports(ApiKey::JoinGroup, 8));
        assert!(!supports(ApiKey::ConsumerGroupHeartbeat, 0));
    }
}
