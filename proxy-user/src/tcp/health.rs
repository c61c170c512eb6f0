//! Upstream health on the control thread: active TCP connect checks (interval, timeout,
//! rise/fall) for routes that configure them, and for the others the expiry of passive
//! ejections. Follows reloads: the checks restart on the new routes (health carried over
//! with the upstream).
use std::{sync::Arc, time::Duration};

use super::{HealthSpec, Route, SharedRoutes};

/// Runs until the future is dropped.
pub async fn run(shared: Arc<SharedRoutes>) {
    loop {
        let routes = shared.latest();
        let mut tasks = tokio::task::JoinSet::new();
        for route in &routes.routes {
            match &route.spec.health {
                Some(spec) => {
                    for i in 0..route.pool.upstreams.len() {
                        tasks.spawn(check(Arc::clone(route), i, spec.clone()));
                    }
                }
                None => {
                    let route = Arc::clone(route);
                    tasks.spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_millis(250));
                        loop {
                            tick.tick().await;
                            route.pool.expire_ejections();
                        }
                    });
                }
            }
        }
        while shared.generation() == routes.generation {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tasks.abort_all();
    }
}

async fn check(route: Arc<Route>, i: usize, spec: HealthSpec) {
    let address = route.pool.upstreams[i].address;
    let (mut ups, mut downs) = (0u32, 0u32);
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = matches!(
            tokio::time::timeout(spec.timeout, tokio::net::TcpStream::connect(address)).await,
            Ok(Ok(_))
        );
        let healthy = route.pool.upstreams[i].healthy();
        if ok {
            ups += 1;
            downs = 0;
            if !healthy && ups >= spec.rise {
                route.pool.set_health(i, true, "health check passed");
            }
        } else {
            downs += 1;
            ups = 0;
            if healthy && downs >= spec.fall {
                route.pool.set_health(i, false, "health check failed");
            }
        }
    }
}
