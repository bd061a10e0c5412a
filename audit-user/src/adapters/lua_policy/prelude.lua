-- The Momentum API the policy host gives scripts, built once per interpreter
-- before any script loads. Called with `host`, the agent's primitives (kept
-- out of the scripts' reach as upvalues), and the source of lua/msys/audit.lua;
-- returns the functions the host calls: begin_script, finish_script, run.
local host, audit_source = ...

local PROVIDER = "inbound-audit's policy host"

-- A table whose missing keys raise, naming the call a script made that is
-- not provided here (instead of "attempt to call a nil value").
local function strict(t, prefix)
  return setmetatable(t, {
    __index = function(_, key)
      error(string.format("%s%s is not provided by %s", prefix, tostring(key), PROVIDER), 2)
    end,
  })
end

-- msys.audit, answered in-process from the agent's counts.
local audit_chunk = assert(load(audit_source, "=msys/audit.lua"))
local audit = audit_chunk()
audit._set_transport(host.answer)
audit._set_transport = nil
audit.configure, audit.disconnect, audit._connection = nil, nil, nil
local msys = rawget(_G, "msys")

-- msys.core: the documented constants. The numbers are ours; scripts use the names.
local core = {
  VALIDATE_CONT = 0,
  VALIDATE_DONE = 1,
  VALIDATE_AGAIN = 2,
  VCTX_MESS = 0,
  VCTX_CONN = 1,
  ECMESS_CTX_MESS = 0,
  ECMESS_CTX_CONN = 1,
}
function core.get_now_ts()
  return host.now()
end
msys.core = core

-- msys.registerModule(name, table): modules in load order, each with its script.
local modules = {}
local loading = nil
local CALLOUTS = {
  validate_connect = true, validate_ehlo = true, validate_mailfrom = true,
  validate_rcptto = true, validate_data = true, validate_data_spool = true,
}
local OTHER_CALLOUTS = {
  init = true, deinit = true, validate_data_spool_each_rcpt = true,
  validate_set_binding = true, validate_rcptto_list = true,
  validate_rcptto_list_final = true, validate_dealloc = true,
}
function msys.registerModule(name, mod)
  if type(name) ~= "string" then
    error("msys.registerModule: bad argument #1 (modname): string expected, got " .. type(name), 2)
  end
  if type(mod) ~= "table" then
    error("msys.registerModule: bad argument #2 (table): table expected, got " .. type(mod), 2)
  end
  if not loading then
    error("msys.registerModule: only while a script loads", 2)
  end
  for key, value in pairs(mod) do
    if type(value) == "function" and not CALLOUTS[key] and not OTHER_CALLOUTS[key]
        and key:match("^validate_") then
      host.log("warn", string.format("%s: module %s: %s is not a callout; it is never called",
        loading.script, name, key))
    end
  end
  modules[#modules + 1] = { name = name, mod = mod, script = loading.script }
  loading.registered = loading.registered + 1
end

-- msys.audit_series: IP- or string-keyed windowed series, held by the agent.
local series = {}
local function series_key(key)
  if type(key) == "table" and key.ip then
    return key.ip -- an accept construct: its remote IP
  end
  if key ~= nil and type(key) ~= "string" then
    error("bad key: a cidr or string, an accept construct or nil expected, got " .. type(key), 3)
  end
  return key
end
function series.define(name, kind, interval, windows, options)
  host.series_define(name, kind, interval, windows)
  return true
end
function series.add(name, options)
  local key, count = options, 1
  if type(options) == "table" and not options.ip then
    key, count = options.key, options.count or 1
  end
  return host.series_add(name, series_key(key), count)
end
function series.count(name, options)
  local key, startv, endv = options, 0, 0
  if type(options) == "table" and not options.ip then
    key, startv, endv = options.key, options.startv or 0, options.endv or 0
  end
  return host.series_count(name, series_key(key), startv, endv)
end
function series.remove_item(name, key)
  return host.series_remove(name, series_key(key))
end
msys.audit_series = series

-- print goes to the agent's log, with the script.
function print(...)
  local parts = {}
  for i = 1, select("#", ...) do
    parts[#parts + 1] = tostring((select(i, ...)))
  end
  host.log("info", table.concat(parts, "\t"))
end

-- require names scripts use.
package.loaded["msys.audit"] = audit
package.loaded["msys.core"] = core
package.loaded["msys.audit_series"] = series
package.loaded["msys.extended.ac"] = audit
package.loaded["msys.extended.vctx"] = core
package.loaded["msys.extended.message"] = core

strict(msys, "msys.")
strict(core, "msys.core.")
strict(audit, "msys.audit.")
strict(series, "msys.audit_series.")

-- The accept construct's methods: audit.lua's, and nothing else.
local AcceptConstruct = getmetatable(audit.accept_construct("127.0.0.1"))
strict(AcceptConstruct, "ac:")

-- vctx: the validation context of one call. Context variables live in the
-- agent (connection: the SMTP session; message: one transaction), so every
-- interpreter sees them.
local Vctx = {}
Vctx.__index = Vctx
strict(Vctx, "vctx:")
local function context_kind(fname, kind)
  if kind ~= core.VCTX_MESS and kind ~= core.VCTX_CONN then
    error(fname .. ": bad argument #1 (type): msys.core.VCTX_MESS or msys.core.VCTX_CONN expected", 3)
  end
  return kind == core.VCTX_CONN and "conn" or "mess"
end
function Vctx:get(kind, key)
  return host.context_get(context_kind("vctx:get", kind), tostring(key))
end
function Vctx:set(kind, key, value)
  host.context_set(context_kind("vctx:set", kind), tostring(key), value)
end
function Vctx:set_code(code, message)
  local number = tonumber(code)
  if not number or number < 200 or number > 599 or number % 1 ~= 0 then
    error("vctx:set_code: bad argument #1 (codenum): an SMTP code from 200 to 599 expected, got "
      .. tostring(code), 2)
  end
  self._code, self._text = math.tointeger(number), message ~= nil and tostring(message) or ""
end
function Vctx:disconnect(code, message)
  local number = tonumber(code) or 421
  self._code, self._text = math.tointeger(number), message ~= nil and tostring(message) or ""
  self._disconnect = true
end
function Vctx:tarpit(interval)
  local seconds = tonumber(interval)
  if not seconds or seconds < 0 then
    error("vctx:tarpit: bad argument #1 (interval): a number of seconds expected", 2)
  end
  rawset(self, "_tarpit", math.max(rawget(self, "_tarpit") or 0, seconds))
end

-- msg: what a policy request carries about the message.
local Msg = {}
Msg.__index = Msg
strict(Msg, "msg:")
local function read_only(fname, ...)
  if select("#", ...) > 0 then
    error(fname .. ": changing the envelope is not possible from a policy request", 3)
  end
end
function Msg:mailfrom(...)
  read_only("msg:mailfrom", ...)
  return self._attrs.sender
end
function Msg:rcptto(...)
  read_only("msg:rcptto", ...)
  return self._attrs.recipient
end
function Msg:get_message_size()
  return tonumber(self._attrs.size) or 0
end
local function peer(ip, port, flag)
  if flag == "ip" then return ip end
  if flag == "port" then return port and tostring(port) or nil end
  if flag == nil or flag == "all" then
    if port then return ip .. ":" .. tostring(port) end
    return ip
  end
  error("bad flag: \"ip\", \"port\" or \"all\" expected", 3)
end
function Msg:reception_peer(flag)
  return peer(self._ip, tonumber(self._attrs.client_port), flag)
end
function Msg:listener_addr(flag)
  return peer(self._attrs.server_address or "", self._port, flag)
end
function Msg:context_get(kind, key)
  return host.context_get(context_kind("msg:context_get", kind), tostring(key))
end
function Msg:context_set(kind, key, value)
  host.context_set(context_kind("msg:context_set", kind), tostring(key), value)
end
function Msg:context_exists(kind, key)
  return host.context_get(context_kind("msg:context_exists", kind), tostring(key)) ~= nil
end

local api = {}

function api.begin_script(script)
  loading = { script = script, registered = 0 }
end

-- Runs the script's modules' init(); returns how many modules it registered.
function api.finish_script()
  local script = loading.script
  local registered = loading.registered
  loading = nil
  for i = #modules - registered + 1, #modules do
    local entry = modules[i]
    local init = rawget(entry.mod, "init")
    if init then
      host.entering(i, entry.name, entry.script, "init")
      if init(entry.mod) ~= true then
        error(string.format("module %s: init() did not return true", entry.name), 0)
      end
    end
  end
  return registered
end

local VALIDATE_CONT, VALIDATE_DONE, VALIDATE_AGAIN =
  core.VALIDATE_CONT, core.VALIDATE_DONE, core.VALIDATE_AGAIN

-- The request's attributes, read from the host when a script asks for one:
-- building a table of all thirty for every call cost more than most
-- scripts' own work.
local Attrs = { __index = function(_, name) return host.attribute(name) end }

-- One phase: every module with the callout, in order, until one returns
-- VALIDATE_DONE. Returns the code, text, tarpit seconds and disconnect flag.
function api.run(callout, ip, port)
  local attrs = setmetatable({}, Attrs)
  audit.set_client(ip, port)
  local ac = audit.accept_construct(ip, port)
  local vctx = setmetatable({}, Vctx)
  local msg = setmetatable({ _attrs = attrs, _ip = ip, _port = port }, Msg)
  for i = 1, #modules do
    local entry = modules[i]
    local f = rawget(entry.mod, callout)
    if f then
      host.entering(i, entry.name, entry.script, callout)
      local result
      if callout == "validate_connect" then
        result = f(entry.mod, ac, vctx)
      elseif callout == "validate_ehlo" then
        result = f(entry.mod, attrs.helo_name or "", ac, vctx)
      elseif callout == "validate_mailfrom" then
        result = f(entry.mod, attrs.sender or "", ac, vctx)
      elseif callout == "validate_rcptto" then
        result = f(entry.mod, msg, attrs.recipient or "", ac, vctx)
      else
        result = f(entry.mod, msg, ac, vctx)
      end
      if result == VALIDATE_DONE then
        break
      elseif result ~= VALIDATE_CONT and result ~= VALIDATE_AGAIN then
        error(string.format("%s returned %s: msys.core.VALIDATE_CONT or VALIDATE_DONE expected",
          callout, tostring(result)), 0)
      end
    end
  end
  return rawget(vctx, "_code"), rawget(vctx, "_text"), rawget(vctx, "_tarpit"),
    rawget(vctx, "_disconnect") == true
end

return api
