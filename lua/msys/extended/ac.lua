-- msys.extended.ac: Momentum scripts require this before calling
-- ac:inbound_session_count. Here an `ac` comes from
-- msys.audit.accept_construct(ip, local_port), so this module only loads
-- msys.audit and returns it.
return require("msys.audit")
