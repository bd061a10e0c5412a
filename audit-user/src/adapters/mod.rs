//! Adapters for the hooks MTAs already speak. Lua hosts use lua/msys/audit.lua
//! over the query socket and Exim uses ${readsocket} on it directly; Postfix
//! needs its own policy-delegation server.

pub mod lua_policy;
pub mod postfix;
