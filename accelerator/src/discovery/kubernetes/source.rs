//! The Kubernetes source as the daemon reads it: the watchers' snapshot, with each pod held
//! against its sidecar's xDS Listeners when `--xds-server` is given.

use crate::discovery::{xds, Health, Reading};

pub const NAME: &str = "kubernetes";
pub const XDS_NAME: &str = "xds";

pub struct KubeSource {
    watch: super::Source,
    xds: Option<xds::Pool>,
}

impl KubeSource {
    pub fn new(watch: super::Source, xds: Option<xds::Pool>) -> KubeSource {
        KubeSource { watch, xds }
    }
}

impl crate::discovery::Source for KubeSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self) -> Reading {
        let snap = self.watch.snapshot();
        let kube = match (&snap.error, snap.synced) {
            (Some(e), _) if snap.throttled => Health::Degraded(e.clone()),
            (Some(e), _) => Health::Failed(e.clone()),
            (None, true) => Health::Ok,
            (None, false) => {
                Health::Waiting("waiting for the first pod and namespace lists".into())
            }
        };
        let mut health = vec![(NAME, kube)];
        if !snap.synced {
            return Reading {
                health,
                ..Default::default()
            };
        }
        let mut d = snap.discovery;
        if let Some(pool) = &mut self.xds {
            health.push((XDS_NAME, xds::check_pods(pool, &mut d, &snap.identities)));
        }
        Reading {
            discovery: Some(d),
            health,
            identities: snap.identities,
        }
    }
}
