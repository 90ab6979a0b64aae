//! Dependency order of services (`requires` and `after`), and cycle detection.

use crate::service::ServiceSpec;
use std::collections::{BTreeMap, BTreeSet};

/// Services that cannot be ordered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DepError {
    /// A dependency cycle; the services in it, the first repeated at the end.
    #[error("dependency cycle between services: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

/// The graph: each service and the known services it waits for. `after` on an unknown service is
/// ignored; `requires` on an unknown service is the supervisor's business (the service fails).
fn graph(specs: &[ServiceSpec]) -> BTreeMap<&str, BTreeSet<&str>> {
    let names: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    specs
        .iter()
        .map(|s| {
            let deps = s
                .dependencies()
                .map(|d| d.as_str())
                .filter(|d| names.contains(d))
                .collect();
            (s.name.as_str(), deps)
        })
        .collect()
}

/// A start order: every service after the services it waits for; ties broken by name so the
/// order is stable.
pub fn start_order(specs: &[ServiceSpec]) -> Result<Vec<String>, DepError> {
    let g = graph(specs);
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::new();
    loop {
        let next: Vec<&str> = g
            .iter()
            .filter(|(n, deps)| !done.contains(*n) && deps.iter().all(|d| done.contains(d)))
            .map(|(n, _)| *n)
            .collect();
        if next.is_empty() {
            break;
        }
        for n in next {
            done.insert(n);
            order.push(n.to_string());
        }
    }
    if order.len() == g.len() {
        return Ok(order);
    }
    let left: BTreeSet<&str> = g.keys().copied().filter(|n| !done.contains(n)).collect();
    Err(DepError::Cycle(find_cycle(&g, &left)))
}

/// A cycle among `left` (each of which waits, directly or not, on a cycle).
fn find_cycle(g: &BTreeMap<&str, BTreeSet<&str>>, left: &BTreeSet<&str>) -> Vec<String> {
    let Some(&start) = left.iter().next() else {
        return Vec::new();
    };
    // Walk from any unresolved node along unresolved dependencies until a node repeats.
    let mut path: Vec<&str> = vec![start];
    loop {
        let cur = path[path.len() - 1];
        let next = g
            .get(cur)
            .and_then(|deps| deps.iter().find(|d| left.contains(*d)).copied());
        let Some(next) = next else {
            return path.iter().map(|s| s.to_string()).collect();
        };
        if let Some(i) = path.iter().position(|p| *p == next) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(next.to_string());
            return cycle;
        }
        path.push(next);
    }
}

/// Names of services that (directly) wait for `name`.
pub fn dependents<'a>(specs: &'a [ServiceSpec], name: &str) -> Vec<&'a str> {
    specs
        .iter()
        .filter(|s| s.dependencies().any(|d| d == name))
        .map(|s| s.name.as_str())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn svc(name: &str, requires: &[&str], after: &[&str]) -> ServiceSpec {
        let text = format!(
            "exec = \"/bin/{name}\"\nrequires = {:?}\nafter = {:?}\n",
            requires, after
        );
        ServiceSpec::parse(name, &text).unwrap()
    }

    #[test]
    fn orders_dependencies_first() {
        let specs = vec![
            svc("agent", &["containerd"], &["network"]),
            svc("containerd", &[], &["network"]),
            svc("network", &[], &[]),
            svc("zlast", &[], &["ghost"]),
        ];
        let order = start_order(&specs).unwrap();
        let pos = |n: &str| order.iter().position(|o| o == n).unwrap();
        assert!(pos("network") < pos("containerd"));
        assert!(pos("containerd") < pos("agent"));
        assert_eq!(order.len(), 4);
        assert_eq!(dependents(&specs, "network"), ["agent", "containerd"]);
    }

    #[test]
    fn cycle_names_the_services() {
        let specs = vec![
            svc("a", &["b"], &[]),
            svc("b", &[], &["c"]),
            svc("c", &["a"], &[]),
            svc("d", &[], &[]),
            svc("e", &["a"], &[]),
        ];
        let err = start_order(&specs).unwrap_err();
        let DepError::Cycle(names) = &err;
        assert_eq!(names.first(), names.last());
        for n in ["a", "b", "c"] {
            assert!(names.iter().any(|x| x == n), "{names:?}");
        }
        assert!(!names.iter().any(|x| x == "d" || x == "e"), "{names:?}");
        assert!(err.to_string().contains("a -> b -> c -> a"), "{err}");
    }
}
