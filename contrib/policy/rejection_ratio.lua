-- Rejection-ratio block: a client with at least MIN_REJECTIONS rejected
-- messages in this hour and the last, and more rejected than received
-- (rejections / (rejections + receptions) above MAX_RATIO), is refused at
-- MAIL FROM with a 550 until its record improves.
--
-- Rejections and receptions are what the MTA reports: the Postfix policy
-- server records refusals and each END-OF-MESSAGE; Exim sends
-- `add rejections|receptions <ip>`. Needs: monitors = ["3600,1"].
require("msys.core");
require("msys.audit");
require("msys.extended.message");

local MIN_REJECTIONS = 5;
local MAX_RATIO = 0.5;

local mod = {};

function mod:validate_mailfrom(str, ac, vctx)
  local window = { startv = 0, endv = 1 };
  local rejected = msys.audit.rejections("3600,1", window);
  local received = msys.audit.receptions("3600,1", window);
  if rejected >= MIN_REJECTIONS and rejected / (rejected + received) > MAX_RATIO then
    vctx:set_code(550, string.format(
      "5.7.1 Too many rejected messages from your address (%d of %d), mail refused",
      rejected, rejected + received));
    return msys.core.VALIDATE_DONE;
  end
  return msys.core.VALIDATE_CONT;
end

msys.registerModule("rejection_ratio", mod);
