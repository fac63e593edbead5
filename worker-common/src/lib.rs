//! What NodeEngine, NetManager and their tests share, so each fact is
//! written once: the NetManager socket API (`netmanager_api`), task ids and
//! job names (`task_id`), default paths (`paths`) and the lenient readers
//! for documents that come from the cluster (`lenient`).

pub mod lenient;
pub mod netmanager_api;
pub mod paths;
pub mod task_id;
