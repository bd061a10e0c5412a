--[[
inbound_audit: rspamd symbols from the inbound-audit agent's live counts.

For each scanned message the plugin asks the agent, on its Unix query socket,
how many SMTP sessions the client's network has open right now and how many
connections it made in a monitor's windows, and inserts a symbol (with its
score) for every configured rule whose count is above its `max`.

It uses rspamd's own asynchronous socket API (rspamd_tcp, which connects to a
Unix socket when `host` is a path and no port is given), so a slow agent never
blocks the worker: the task waits for the answer, up to `timeout`.

When the agent cannot be asked (socket missing, refused, timed out) or answers
`ERR`, the rule is skipped with a log line and no symbol: mail is scored as if
the plugin were absent (fail open).

Installed as rspamd installs third-party plugins: this file in
/etc/rspamd/plugins.d/, and an `inbound_audit { }` section (README, "rspamd").
]]

local N = 'inbound_audit'

if confighelp then
  rspamd_config:add_example(nil, N,
    'Symbols from the inbound-audit agent: live sessions and windowed connections per client network',
    [[
inbound_audit {
  socket = "/run/inbound-audit/audit.sock";
  timeout = 1.0; # seconds per request
  symbols {
    INBOUND_AUDIT_SESSIONS {
      count = "sessions";      # sessions | connections | receptions | rejections
      service = "SMTP";        # sessions: the agent's service name
      ipv4_prefix = 24;
      ipv6_prefix = 64;
      max = 10;                # fires when the count is above max
      score = 5.0;
    }
    INBOUND_AUDIT_CONNECTIONS {
      count = "connections";
      monitor = "60,1";        # a monitor configured in the agent
      startv = 0;
      endv = 1;
      ipv4_prefix = 24;
      ipv6_prefix = 64;
      max = 30;
      score = 3.0;
    }
  }
}
]])
  return
end

local rspamd_logger = require 'rspamd_logger'
local rspamd_tcp = require 'rspamd_tcp'
local lua_util = require 'lua_util'

local DEFAULT_SOCKET = '/run/inbound-audit/audit.sock'
local DEFAULT_TIMEOUT = 1.0
local COUNTS = { sessions = true, connections = true, receptions = true, rejections = true }
-- The keys a rule may have, by its count; `enabled` is rspamd's own.
local RULE_KEYS = {
  count = true, ipv4_prefix = true, ipv6_prefix = true, max = true, score = true,
  description = true,
}
local SESSION_KEYS = { service = true }
local WINDOW_KEYS = { monitor = true, startv = true, endv = true }
local TOP_KEYS = { socket = true, timeout = true, symbols = true, enabled = true }

-- Used when the config has no `symbols` table: the two checks the plugin is for.
local DEFAULT_SYMBOLS = {
  INBOUND_AUDIT_SESSIONS = {
    count = 'sessions', service = 'SMTP', ipv4_prefix = 24, ipv6_prefix = 64,
    max = 10, score = 5.0,
  },
  INBOUND_AUDIT_CONNECTIONS = {
    count = 'connections', monitor = '60,1', startv = 0, endv = 1,
    ipv4_prefix = 24, ipv6_prefix = 64, max = 30, score = 3.0,
  },
}

-- A config error names the key and disables the module: a half-understood
-- limit would score mail differently from what the operator wrote.
local function bad_config(key, message)
  rspamd_logger.errx(rspamd_config, '%s: bad config %s: %s; module disabled', N, key, message)
  lua_util.disable_module(N, 'fail')
end

local function integer_in(value, low, high)
  local n = tonumber(value)
  return n ~= nil and n == math.floor(n) and n >= low and n <= high and n or nil
end

-- The request is one line of the agent's query protocol: the client after `@`,
-- then Momentum's Lua call form, with relative CIDRs (`"/24"`) masking the
-- client's address agent-side.
local function parse_rule(name, raw)
  if type(raw) ~= 'table' then
    return nil, string.format('symbols.%s', name), 'must be a table'
  end
  local key = function(k) return string.format('symbols.%s.%s', name, k) end
  local rule = { name = name }
  rule.count = raw.count or 'sessions'
  if not COUNTS[rule.count] then
    return nil, key('count'), 'must be sessions, connections, receptions or rejections'
  end
  -- A misspelt key would otherwise silently fall back to its default.
  local own = rule.count == 'sessions' and SESSION_KEYS or WINDOW_KEYS
  for k in pairs(raw) do
    if not RULE_KEYS[k] and not own[k] then
      return nil, key(tostring(k)), string.format('unknown key for count = "%s"', rule.count)
    end
  end
  rule.ipv4_prefix = integer_in(raw.ipv4_prefix or 24, 0, 32)
  if not rule.ipv4_prefix then
    return nil, key('ipv4_prefix'), 'must be an integer from 0 to 32'
  end
  rule.ipv6_prefix = integer_in(raw.ipv6_prefix or 64, 0, 128)
  if not rule.ipv6_prefix then
    return nil, key('ipv6_prefix'), 'must be an integer from 0 to 128'
  end
  rule.max = integer_in(raw.max, 0, 2 ^ 53)
  if not rule.max then
    return nil, key('max'), 'must be a non-negative integer (the symbol fires above it)'
  end
  rule.score = tonumber(raw.score or 1.0)
  if not rule.score then
    return nil, key('score'), 'must be a number'
  end
  rule.description = raw.description
  if rule.count == 'sessions' then
    rule.service = raw.service or 'SMTP'
    if type(rule.service) ~= 'string' or not rule.service:match('^[%w_%.%-]+$') then
      return nil, key('service'), 'must be a service name (letters, digits, _ . -)'
    end
    rule.request = string.format('msys.audit.inbound_session_count("/%%d", "%s")', rule.service)
    rule.description = rule.description or string.format(
      'More than %d live %s sessions from the client network', rule.max, rule.service)
  else
    rule.monitor = raw.monitor
    if type(rule.monitor) ~= 'string' or not rule.monitor:match('^%s*%d+%s*,%s*%d+%s*$') then
      return nil, key('monitor'), 'must be a monitor configured in the agent, "W,N"'
    end
    rule.startv = integer_in(raw.startv or 0, 0, 2 ^ 31)
    rule.endv = integer_in(raw.endv or 0, 0, 2 ^ 31)
    if not rule.startv or not rule.endv then
      return nil, key(rule.startv and 'endv' or 'startv'), 'must be a non-negative integer'
    end
    rule.request = string.format('msys.audit.%s("%s", {cidr="/%%d", startv=%d, endv=%d})',
      rule.count, rule.monitor, rule.startv, rule.endv)
    rule.description = rule.description or string.format(
      'More than %d %s from the client network in monitor %s windows %d-%d',
      rule.max, rule.count, rule.monitor, rule.startv, rule.endv)
  end
  return rule
end

local function check(task, settings, rule)
  local ip = task:get_from_ip()
  if not ip or not ip:is_valid() then
    return
  end
  local prefix = ip:get_version() == 6 and rule.ipv6_prefix or rule.ipv4_prefix
  local address = ip:to_string()
  local network = string.format('%s/%d', ip:apply_mask(prefix):to_string(), prefix)
  local line = string.format('@%s %s\n', address, string.format(rule.request, prefix))

  local function on_answer(err, data)
    if err then
      rspamd_logger.warnx(task, '%s: %s: no answer from %s for %s (%s); no symbol',
        N, rule.name, settings.socket, address, err)
      return
    end
    local answer = tostring(data):gsub('[\r\n]+$', '')
    local count = answer:match('^OK (%d+)$')
    if not count then
      rspamd_logger.warnx(task, '%s: %s: the agent answered "%s" for %s; no symbol',
        N, rule.name, answer, address)
      return
    end
    count = tonumber(count)
    lua_util.debugm(N, task, '%s: %s has %s (max %s)', rule.name, network, count, rule.max)
    if count > rule.max then
      task:insert_result(rule.name, 1.0, string.format('%s=%d', network, count))
    end
  end

  local sent = rspamd_tcp.request({
    task = task,
    host = settings.socket,
    timeout = settings.timeout,
    data = line,
    stop_pattern = '\n',
    callback = on_answer,
  })
  -- A refused request has already called on_answer with the reason.
  if not sent then
    lua_util.debugm(N, task, '%s: request to %s not sent', rule.name, settings.socket)
  end
end

local opts = rspamd_config:get_all_opt(N)
if not opts then
  lua_util.disable_module(N, 'config')
  return
end

for k in pairs(opts) do
  if not TOP_KEYS[k] then
    bad_config(tostring(k), 'unknown key (socket, timeout, symbols)')
    return
  end
end

local settings = {
  socket = opts.socket or DEFAULT_SOCKET,
  timeout = tonumber(opts.timeout or DEFAULT_TIMEOUT),
}
if type(settings.socket) ~= 'string' or settings.socket:sub(1, 1) ~= '/' then
  bad_config('socket', 'must be an absolute path to the agent\'s query socket')
  return
end
if not settings.timeout or settings.timeout <= 0 then
  bad_config('timeout', 'must be a positive number of seconds')
  return
end

local rules = {}
local configured = opts.symbols or DEFAULT_SYMBOLS
if type(configured) ~= 'table' then
  bad_config('symbols', 'must be a table of symbol names')
  return
end
for name, raw in pairs(configured) do
  local rule, key, message = parse_rule(name, raw)
  if not rule then
    bad_config(key, message)
    return
  end
  table.insert(rules, rule)
end
if #rules == 0 then
  lua_util.disable_module(N, 'config')
  return
end

for _, rule in ipairs(rules) do
  rspamd_config:register_symbol({
    name = rule.name,
    type = 'normal',
    -- Asks about the connection, not the content: also for empty messages.
    flags = 'empty',
    callback = function(task) check(task, settings, rule) end,
    score = rule.score,
    group = N,
    description = rule.description,
  })
  rspamd_logger.infox(rspamd_config, '%s: %s: %s above %s, score %s, asking %s',
    N, rule.name, rule.count, rule.max, rule.score, settings.socket)
end
