//! Which kernel slot each configured service gets: pure logic, shared by the
//! real maps and the test fake, so slot reuse is tested without a kernel.

use std::collections::HashMap;

use audit_common::{ServiceName, MAX_SERVICES};

use crate::domain::ServicePorts;

use super::error::LoadError;

/// The slots of the configured services, and the names to write for slots
/// newly given to a service.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// Service name → slot.
    pub slots: HashMap<String, u8>,
    /// Slots that change hands (or are first used): slot → its new name.
    pub renamed: Vec<(u8, String)>,
}

/// Gives each service a slot: the one its name already has in `names` (its
/// counts stay its own), else a free slot or one whose old service is gone and
/// counts nothing now (`slot_in_use` false).
pub fn assign_slots(
    names: &[Option<String>],
    services: &[ServicePorts],
    slot_in_use: impl Fn(u8) -> bool,
) -> Result<SlotPlan, LoadError> {
    let mut names: Vec<Option<String>> = names.to_vec();
    names.resize(MAX_SERVICES, None);
    let mut slots = HashMap::new();
    for service in services {
        if let Some(slot) = names
            .iter()
            .position(|n| n.as_deref() == Some(&service.name))
        {
            slots.insert(service.name.clone(), slot as u8);
        }
    }
    let mut renamed = Vec::new();
    for service in services {
        if slots.contains_key(&service.name) {
            continue;
        }
        let free = (0..MAX_SERVICES).find(|&slot| {
            !slots.values().any(|&s| s as usize == slot)
                && match &names[slot] {
                    None => true,
                    Some(_) => !slot_in_use(slot as u8),
                }
        });
        let Some(slot) = free else {
            return Err(LoadError::TooManyServices {
                count: services.len(),
                max: MAX_SERVICES,
            });
        };
        names[slot] = Some(service.name.clone());
        renamed.push((slot as u8, service.name.clone()));
        slots.insert(service.name.clone(), slot as u8);
    }
    Ok(SlotPlan { slots, renamed })
}

/// What `PORT_SERVICES` must hold for these slots: port → slot + 1.
pub fn port_values(services: &[ServicePorts], slots: &HashMap<String, u8>) -> HashMap<u16, u32> {
    let mut wanted = HashMap::new();
    for service in services {
        for &port in &service.ports {
            wanted.insert(port, u32::from(slots[&service.name]) + 1);
        }
    }
    wanted
}

pub fn decode_name(name: &ServiceName) -> Option<String> {
    let len = name
        .bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name.bytes.len());
    (len > 0).then(|| String::from_utf8_lossy(&name.bytes[..len]).into_owned())
}

pub fn encode_name(name: &str) -> ServiceName {
    let mut out = ServiceName::default();
    let bytes = name.as_bytes();
    let len = bytes.len().min(out.bytes.len());
    out.bytes[..len].copy_from_slice(&bytes[..len]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ports: &[u16]) -> ServicePorts {
        ServicePorts {
            name: name.into(),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn a_known_name_keeps_its_slot_and_a_new_one_takes_a_free_slot() {
        let names = vec![None, Some("SMTP".to_string())];
        let plan = assign_slots(
            &names,
            &[service("SMTP", &[25]), service("Submission", &[587])],
            |_| true,
        )
        .unwrap();
        assert_eq!(plan.slots["SMTP"], 1);
        assert_eq!(plan.slots["Submission"], 0);
        assert_eq!(plan.renamed, vec![(0, "Submission".to_string())]);
    }

    #[test]
    fn a_gone_service_slot_is_reused_only_when_nothing_counts_in_it() {
        let names: Vec<Option<String>> =
            (0..MAX_SERVICES).map(|i| Some(format!("old{i}"))).collect();
        let busy = assign_slots(&names, &[service("New", &[2525])], |_| true);
        assert!(matches!(busy, Err(LoadError::TooManyServices { .. })));
        let plan = assign_slots(&names, &[service("New", &[2525])], |slot| slot != 5).unwrap();
        assert_eq!(plan.slots["New"], 5);
    }

    #[test]
    fn names_round_trip_and_ports_point_at_slot_plus_one() {
        assert_eq!(
            decode_name(&encode_name("ECStream")).as_deref(),
            Some("ECStream")
        );
        assert_eq!(decode_name(&ServiceName::default()), None);
        let slots = HashMap::from([("SMTP".to_string(), 2u8)]);
        let wanted = port_values(&[service("SMTP", &[25, 587])], &slots);
        assert_eq!(wanted, HashMap::from([(25, 3), (587, 3)]));
    }
}
