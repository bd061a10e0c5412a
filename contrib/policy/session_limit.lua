-- Per-/24 session limit: a client whose /24 already holds more than
-- MAX_SESSIONS live SMTP sessions (its own included) is refused with a 421
-- when it connects, and Postfix or Exim closes the connection.
--
-- Needs: nothing beyond the agent's own session counts.
require("msys.core");
require("msys.audit");
require("msys.extended.ac");
require("msys.extended.vctx");

local MAX_SESSIONS = 10;

local mod = {};

function mod:validate_connect(ac, vctx)
  local live = ac:inbound_session_count("/24");
  if live > MAX_SESSIONS then
    vctx:set_code(421, "4.7.0 Too many sessions from your network (" .. live .. "), try again later");
    return msys.core.VALIDATE_DONE;
  end
  -- Later phases (and other scripts) can read what was seen at connect.
  vctx:set(msys.core.VCTX_CONN, "sessions_24", tostring(live));
  return msys.core.VALIDATE_CONT;
end

msys.registerModule("session_limit", mod);
