//! The DNS view of the object stream: the Services and EndpointSlices, and the current
//! [`Zone`] snapshot, swapped atomically after every batch of changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use svcplane_model::{Change, EndpointSlice, Kind, NamespacedName, Object, Service};

use crate::records::{Zone, ZoneConfig};

/// Objects by name and the published snapshot. Cheap to share: readers only load the `Arc`.
pub struct ZoneStore {
    config: ZoneConfig,
    /// Shared with the source and the engine, not copied.
    services: HashMap<NamespacedName, Arc<Service>>,
    slices: HashMap<NamespacedName, Arc<EndpointSlice>>,
    current: Arc<ArcSwap<Zone>>,
    serial: u32,
}

impl ZoneStore {
    pub fn new(config: ZoneConfig) -> ZoneStore {
        let serial = initial_serial();
        let zone = Zone::empty(&config, serial);
        ZoneStore {
            config,
            services: HashMap::new(),
            slices: HashMap::new(),
            current: Arc::new(ArcSwap::from_pointee(zone)),
            serial,
        }
    }

    /// The handle the server reads snapshots from.
    pub fn snapshot_handle(&self) -> Arc<ArcSwap<Zone>> {
        self.current.clone()
    }

    /// Apply a batch of changes and publish a new snapshot when DNS-relevant objects changed.
    /// Returns whether a new snapshot was published.
    pub fn apply<'a>(&mut self, changes: impl IntoIterator<Item = &'a Change>) -> bool {
        let mut changed = false;
        for change in changes {
            changed |= match change {
                Change::Apply(Object::Service(s)) => {
                    self.services.insert(s.name.clone(), s.clone()).as_ref() != Some(s)
                }
                Change::Apply(Object::EndpointSlice(s)) => {
                    self.slices.insert(s.name.clone(), s.clone()).as_ref() != Some(s)
                }
                Change::Apply(_) => false,
                Change::Delete(key) => match key.kind {
                    Kind::Service => self.services.remove(&key.name).is_some(),
                    Kind::EndpointSlice => self.slices.remove(&key.name).is_some(),
                    _ => false,
                },
            };
        }
        if changed {
            self.publish();
        }
        changed
    }

    /// Rebuild the snapshot from the objects and swap it in.
    pub fn publish(&mut self) {
        // The SOA serial only has to grow between snapshots.
        self.serial = self.serial.wrapping_add(1).max(initial_serial());
        let start = std::time::Instant::now();
        let zone = Zone::build(
            &self.config,
            self.services.values().map(|s| &**s),
            self.slices.values().map(|s| &**s),
            self.serial,
        );
        tracing::debug!(
            services = zone.services(),
            names = zone.names(),
            serial = self.serial,
            took = ?start.elapsed(),
            "DNS zone rebuilt"
        );
        self.current.store(Arc::new(zone));
    }
}

fn initial_serial() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Keep `store` in step with a source's events, passing each event on to `forward` (the
/// proxy's engine) when given, so DNS and dataplane see the same stream. Returns when the
/// source closes, or when the forward receiver is gone.
pub async fn follow(
    store: ZoneStore,
    mut events: tokio::sync::mpsc::Receiver<svcplane_model::SourceEvent>,
    forward: Option<tokio::sync::mpsc::Sender<svcplane_model::SourceEvent>>,
) {
    // `None` once a rebuild panicked: DNS keeps its last snapshot, and the engine still
    // gets every event (a DNS bug must not stop the dataplane).
    let mut store = Some(store);
    while let Some(mut event) = events.recv().await {
        let is_change = matches!(event, svcplane_model::SourceEvent::Changes(_));
        if let Some(mut s) = store.take_if(|_| is_change) {
            // A rebuild at 10k services takes ~100 ms: keep it off the runtime's workers,
            // which serve the queries.
            let rebuilt = tokio::task::spawn_blocking(move || {
                let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if let svcplane_model::SourceEvent::Changes(changes) = &event {
                        s.apply(changes);
                    }
                }));
                (applied.is_ok().then_some(s), event)
            })
            .await;
            // Only cancelled when the runtime shuts down.
            let Ok((s, back)) = rebuilt else { return };
            if s.is_none() {
                tracing::error!("DNS zone rebuild failed; DNS answers no longer follow changes");
            }
            store = s;
            event = back;
        }
        if let Some(tx) = &forward
            && tx.send(event).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{LowerName, Name, RecordType};
    use svcplane_model::{Format, SourceEvent, parse_manifest};

    fn changes(yaml: &str) -> Vec<Change> {
        let parsed = parse_manifest(yaml, Format::Yaml).expect("parse");
        parsed.objects.into_iter().map(Change::Apply).collect()
    }

    fn a_records(zone: &Zone, name: &str) -> usize {
        let qname = LowerName::new(&Name::from_ascii(name).expect("name"));
        match zone.lookup(&qname, RecordType::A) {
            crate::Lookup::Answer(a) => a.answers.len(),
            crate::Lookup::Outside => 0,
        }
    }

    #[tokio::test]
    async fn follow_updates_the_zone_and_passes_every_event_on_in_order() {
        let store = ZoneStore::new(ZoneConfig::new("cluster.local", 5).expect("domain"));
        let zone = store.snapshot_handle();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let (fwd_tx, mut fwd_rx) = tokio::sync::mpsc::channel(8);
        let task = tokio::spawn(follow(store, rx, Some(fwd_tx)));
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n";
        let first = SourceEvent::Changes(changes(svc));
        tx.send(first.clone()).await.expect("send");
        tx.send(SourceEvent::Synced).await.expect("send");
        assert_eq!(fwd_rx.recv().await, Some(first));
        assert_eq!(fwd_rx.recv().await, Some(SourceEvent::Synced));
        // Forwarded after the rebuild: the new snapshot is already in place.
        assert_eq!(a_records(&zone.load(), "web.demo.svc.cluster.local."), 1);
        let key = svcplane_model::ObjectKey {
            kind: Kind::Service,
            name: NamespacedName::new("demo", "web"),
        };
        tx.send(SourceEvent::Changes(vec![Change::Delete(key)]))
            .await
            .expect("send");
        assert!(fwd_rx.recv().await.is_some());
        assert_eq!(a_records(&zone.load(), "web.demo.svc.cluster.local."), 0);
        drop(tx);
        task.await.expect("follow ends when the source closes");
        assert_eq!(fwd_rx.recv().await, None);
    }
}
