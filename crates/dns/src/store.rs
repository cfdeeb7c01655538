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
    services: HashMap<NamespacedName, Service>,
    slices: HashMap<NamespacedName, EndpointSlice>,
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
            self.services.values(),
            self.slices.values(),
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
    mut store: ZoneStore,
    mut events: tokio::sync::mpsc::Receiver<svcplane_model::SourceEvent>,
    forward: Option<tokio::sync::mpsc::Sender<svcplane_model::SourceEvent>>,
) {
    while let Some(mut event) = events.recv().await {
        if matches!(event, svcplane_model::SourceEvent::Changes(_)) {
            // A rebuild at 10k services takes tens of milliseconds: keep it off the runtime's
            // workers, which serve the queries.
            let rebuilt = tokio::task::spawn_blocking(move || {
                if let svcplane_model::SourceEvent::Changes(changes) = &event {
                    store.apply(changes);
                }
                (store, event)
            })
            .await;
            match rebuilt {
                Ok(back) => (store, event) = back,
                Err(error) => {
                    tracing::error!(%error, "DNS zone rebuild failed; DNS stops following changes");
                    return;
                }
            }
        }
        if let Some(tx) = &forward
            && tx.send(event).await.is_err()
        {
            return;
        }
    }
}
