-- Connections-per-minute tarpit: a client that connected more than
-- MAX_PER_MINUTE times in this minute and the last is held DELAY seconds
-- before its greeting (Postfix: the `sleep` action at CONNECT; Exim: `delay`),
-- and again before each recipient, which slows a flood without refusing mail.
--
-- Needs: monitors = ["60,1"] in the agent's config.
require("msys.core");
require("msys.audit");
require("msys.extended.vctx");

local MAX_PER_MINUTE = 20;
local DELAY = 3;

local mod = {};

local function connections()
  return msys.audit.connections("60,1", { startv = 0, endv = 1 });
end

function mod:validate_connect(ac, vctx)
  local recent = connections();
  if recent > MAX_PER_MINUTE then
    vctx:tarpit(DELAY);
    vctx:set(msys.core.VCTX_CONN, "tarpit", tostring(recent));
  end
  return msys.core.VALIDATE_CONT;
end

function mod:validate_rcptto(msg, str, ac, vctx)
  if vctx:get(msys.core.VCTX_CONN, "tarpit") then
    vctx:tarpit(DELAY);
  end
  return msys.core.VALIDATE_CONT;
end

msys.registerModule("connection_tarpit", mod);
