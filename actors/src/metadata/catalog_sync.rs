//! Hosting caught up with the durable catalog after the metadata actor crashed: a durable
//! apply whose hosting or retiring never ran (the crash dropped it) is found by comparing the
//! catalog with what this broker hosts.

use super::{Done, Effect, Metadata, Outcome};

impl Metadata {
    /// After a crash: a durable apply whose hosting or retiring never ran (the crash dropped
    /// it) is caught up by comparing the durable catalog with what this broker hosts.
    pub(super) fn reconcile_hosting(&mut self) {
        let hosted = self.registry.list();
        let mut effects: Vec<Done> = Vec::new();
        for meta in self.catalog.topics.values() {
            if !hosted.iter().any(|h| h.meta.topic_id == meta.topic_id) {
                effects.push((
                    None,
                    Ok(Outcome::Created(meta.clone())),
                    Effect::Host(meta.clone()),
                ));
            }
        }
        for handle in &hosted {
            let kept = self
                .catalog
                .topics
                .get(&handle.meta.name)
                .is_some_and(|t| t.topic_id == handle.meta.topic_id);
            if !kept {
                let name = handle.meta.name.clone();
                effects.push((None, Ok(Outcome::Deleted), Effect::Retire(name)));
            }
        }
        if !effects.is_empty() {
            tracing::info!(
                changes = effects.len(),
                "hosting caught up with the catalog after a restart"
            );
            self.announce(effects);
        }
    }
}
