-- msys.audit: Momentum's inbound_audit Lua functions, answered by the
-- inbound-audit agent over its Unix socket.
--
--   require("msys.audit")
--   msys.audit.set_client("203.0.113.9", 25)
--   local live = msys.audit.inbound_session_count("/24", "SMTP")
--   local conn = msys.audit.connections("60,1")
--
-- Works in any Lua 5.1-5.4 host with LuaSocket (socket.unix; Debian package
-- lua-socket). Every call is sent as the Momentum call written as Lua source
-- (`msys.audit.connections("60,1", {cidr="/24"})`), one request per line, and
-- the agent answers `OK <n>` or `ERR <code> <message>`; an ERR is raised with
-- error(), as Momentum raises its errors.
--
-- The connection to the agent is opened on the first call and kept. After a
-- transport failure (the agent restarted, a timeout) the module reconnects once
-- and sends the request again; if that fails too, the call raises.

local audit = {}

-- Momentum scripts call `msys.audit.x(...)` after `require("msys.audit")`:
-- make (or extend) the global `msys` table.
local msys = rawget(_G, "msys")
if type(msys) ~= "table" then
  msys = {}
  rawset(_G, "msys", msys)
end
msys.audit = audit

local DEFAULT_SOCKET = "/run/inbound-audit/audit.sock"
local DEFAULT_TIMEOUT = 5
local MAX_REQUEST_LEN = 4096
local MAX_NESTING = 16

local unpack = table.unpack or unpack -- luacheck: ignore (5.1)

-- Settings, the connection and counters. `socket_path` nil: the environment
-- (INBOUND_AUDIT_SOCKET) or the default, looked up at each connect.
local settings = { socket_path = nil, timeout = DEFAULT_TIMEOUT }
local connection = nil -- a connected LuaSocket unix stream, or nil
local counters = { connects = 0, reconnects = 0, requests = 0 }
local client = nil -- { ip = "...", port = n or nil } set by set_client
-- An embedding host that holds the counts itself (the agent's own policy
-- host) answers request lines in-process instead of over the socket.
local in_process = nil

---------------------------------------------------------------------------
-- Errors. Internal code raises a tagged table; each public function turns it
-- into a string error at the caller's level (error(message, 2)), the way a
-- Momentum C function reports errors against the calling script line.

local Failure = {}

local function raise(message)
  error(setmetatable({ message = message }, Failure), 0)
end

local function pack(...)
  return { n = select("#", ...), ... }
end

local function public(impl)
  return function(...)
    local results = pack(pcall(impl, ...))
    if results[1] then
      return unpack(results, 2, results.n)
    end
    local failure = results[2]
    if getmetatable(failure) == Failure then
      error(failure.message, 2)
    end
    error(failure, 0) -- a bug in this module: pass it on untouched
  end
end

local function describe_type(value)
  if math.type and type(value) == "number" then
    return math.type(value) == "integer" and "integer" or "number"
  end
  return type(value)
end

local function bad_argument(fname, position, name, expected, value)
  raise(string.format("%s: bad argument #%d (%s): %s expected, got %s",
    fname, position, name, expected, describe_type(value)))
end

local function check_arity(fname, max, count)
  if count > max then
    raise(string.format("%s: takes at most %d argument%s, got %d",
      fname, max, max == 1 and "" or "s", count))
  end
end

local function optional_string(fname, position, name, value)
  if value ~= nil and type(value) ~= "string" then
    bad_argument(fname, position, name, "string or nil", value)
  end
end

local function is_integer(value)
  return type(value) == "number" and value == value and value == math.floor(value)
      and value >= -9223372036854775808 and value < 9223372036854775808
end

---------------------------------------------------------------------------
-- Serialization: values back to Lua source text the agent reads.

local RESERVED = {}
for word in ([[and break do else elseif end false for function goto if in
               local nil not or repeat return then true until while]]):gmatch("%a+") do
  RESERVED[word] = true
end

local function quote_string(text)
  -- Backslash and quote escaped; control characters, DEL and every byte
  -- outside ASCII as three-digit \ddd, so the request line is plain ASCII
  -- and never contains a line break.
  return '"' .. text:gsub('[%c"\\\128-\255]', function(char)
    if char == '"' or char == "\\" then
      return "\\" .. char
    end
    return string.format("\\%03d", char:byte())
  end) .. '"'
end

local serialize

local function serialize_table(fname, value, depth, seen)
  if seen[value] then
    raise(fname .. ": cannot send a table that contains itself")
  end
  if depth > MAX_NESTING then
    raise(fname .. ": tables nested too deeply")
  end
  seen[value] = true
  local keys = {}
  for key in pairs(value) do
    if type(key) ~= "string" or not key:match("^[%a_][%w_]*$") or RESERVED[key] then
      raise(string.format(
        "%s: table key %s cannot be sent: only keys that are Lua names (like cidr=) are supported",
        fname, type(key) == "string" and quote_string(key) or tostring(key)))
    end
    keys[#keys + 1] = key
  end
  table.sort(keys) -- a stable request text for the same table
  local fields = {}
  for i, key in ipairs(keys) do
    fields[i] = key .. "=" .. serialize(fname, value[key], depth + 1, seen)
  end
  seen[value] = nil
  return "{" .. table.concat(fields, ", ") .. "}"
end

function serialize(fname, value, depth, seen)
  local kind = type(value)
  if kind == "nil" then
    return "nil"
  elseif kind == "boolean" then
    return value and "true" or "false"
  elseif kind == "string" then
    return quote_string(value)
  elseif kind == "number" then
    if not is_integer(value) then
      raise(string.format("%s: only integers can be sent, got %s", fname, tostring(value)))
    end
    return string.format("%d", value)
  elseif kind == "table" then
    return serialize_table(fname, value, depth or 0, seen or {})
  end
  raise(string.format("%s: a %s cannot be sent to the agent", fname, kind))
end

-- `name(a, b)` with trailing nil arguments left out (they mean "omitted").
local function call_text(fname, name, args, count)
  while count > 0 and args[count] == nil do
    count = count - 1
  end
  local parts = {}
  for i = 1, count do
    parts[i] = serialize(fname, args[i])
  end
  return name .. "(" .. table.concat(parts, ", ") .. ")"
end

---------------------------------------------------------------------------
-- Client addresses: "@ip ", "@ip:port ", "@[ipv6]:port ".

-- Returns the address without brackets, or nil and why not.
local function normalize_ip(ip)
  if type(ip) ~= "string" then
    return nil, "string expected, got " .. describe_type(ip)
  end
  local bare = ip:match("^%[(.*)%]$") or ip
  local a, b, c, d = bare:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if a then
    if tonumber(a) > 255 or tonumber(b) > 255 or tonumber(c) > 255 or tonumber(d) > 255 then
      return nil, "not an IPv4 address: " .. quote_string(ip)
    end
    return bare
  end
  if bare:find(":", 1, true) and bare:match("^[%x:.]+$") then
    return bare
  end
  return nil, "not an IPv4 or IPv6 address: " .. quote_string(ip)
end

local function check_port(fname, position, port)
  if port == nil then
    return nil
  end
  if not is_integer(port) or port < 1 or port > 65535 then
    bad_argument(fname, position, "local_port", "port number 1-65535 or nil", port)
  end
  return port
end

local function context_prefix(ip, port)
  if port == nil then
    return "@" .. ip .. " "
  elseif ip:find(":", 1, true) then
    return string.format("@[%s]:%d ", ip, port)
  end
  return string.format("@%s:%d ", ip, port)
end

---------------------------------------------------------------------------
-- Transport.

local function socket_path()
  return settings.socket_path or os.getenv("INBOUND_AUDIT_SOCKET") or DEFAULT_SOCKET
end

local unix_stream -- the LuaSocket constructor, loaded on first use

local function load_luasocket()
  if unix_stream then
    return unix_stream
  end
  -- socket.core ignores SIGPIPE, so a write to a closed agent connection is
  -- an error return ("closed"), not the death of the host process.
  pcall(require, "socket")
  local ok, unix = pcall(require, "socket.unix")
  if not ok then
    return nil, "LuaSocket's socket.unix is not available (Debian: apt-get install lua-socket): "
        .. tostring(unix)
  end
  if type(unix) == "table" and unix.stream then
    unix_stream = unix.stream -- LuaSocket 3.x
  else
    unix_stream = unix        -- LuaSocket 2.x: socket.unix() is the constructor
  end
  return unix_stream
end

local function disconnect()
  if connection then
    pcall(connection.close, connection)
    connection = nil
  end
end

local function connect()
  local constructor, why = load_luasocket()
  if not constructor then
    return nil, why, true
  end
  local sock, err = constructor()
  if not sock then
    return nil, "cannot create a Unix socket: " .. tostring(err)
  end
  sock:settimeout(settings.timeout)
  local path = socket_path()
  local ok
  ok, err = sock:connect(path)
  if not ok then
    sock:close()
    return nil, "connect: " .. tostring(err)
  end
  counters.connects = counters.connects + 1
  connection = sock
  return sock
end

-- Sends one line and reads one answer line on the current connection.
-- Returns the answer, or nil, the error and whether the request went out whole.
local function exchange(sock, line)
  local sent, err = sock:send(line .. "\n")
  if not sent then
    return nil, "send: " .. tostring(err), false
  end
  local answer
  answer, err = sock:receive("*l")
  if not answer then
    return nil, "receive: " .. tostring(err), true
  end
  return answer
end

-- One request, one answer line. `replayable` false: a request with an effect
-- (add) is not sent again once it went out whole and only the answer timed
-- out, since the agent may have applied it.
local function transact(line, replayable)
  local last_error
  for attempt = 1, 2 do
    if attempt == 2 then
      counters.reconnects = counters.reconnects + 1
    end
    local sock, err, fatal = connection, nil, false
    if not sock then
      sock, err, fatal = connect()
    end
    if sock then
      local answer, sent_whole
      answer, err, sent_whole = exchange(sock, line)
      if answer then
        return answer
      end
      disconnect()
      if not replayable and sent_whole and err:find("timeout", 1, true) then
        return nil, err .. " (not sent again: the agent may have applied it)"
      end
    end
    last_error = err
    if fatal then
      break
    end
  end
  return nil, last_error
end

-- Sends `request` on behalf of public function `fname` and returns the count.
local function query(fname, request, replayable)
  if #request > MAX_REQUEST_LEN then
    raise(string.format("%s: request is %d bytes, over the agent's %d-byte limit",
      fname, #request, MAX_REQUEST_LEN))
  end
  counters.requests = counters.requests + 1
  local answer, err
  if in_process then
    answer = in_process(request)
  else
    answer, err = transact(request, replayable ~= false)
  end
  if not answer then
    raise(string.format("%s: transport error with the inbound-audit agent at %s: %s",
      fname, socket_path(), err))
  end
  local count = answer:match("^OK (%-?%d+)$")
  if count then
    return math.tointeger and math.tointeger(tonumber(count)) or tonumber(count)
  end
  local code, message = answer:match("^ERR (%S+) ?(.*)$")
  if code then
    if code == "too_long" or code == "busy" then
      disconnect() -- the agent closes the connection after these
    end
    raise(string.format("%s: %s %s", fname, code, message))
  end
  disconnect() -- out of step with the agent: start over
  raise(string.format("%s: protocol error: unexpected answer from the agent: %s", fname, quote_string(answer)))
end

local function with_client(request)
  if client then
    return context_prefix(client.ip, client.port) .. request
  end
  return request
end

---------------------------------------------------------------------------
-- Momentum's functions.

-- msys.audit.inbound_session_count(cidr, servicename)
audit.inbound_session_count = public(function(...)
  local fname = "msys.audit.inbound_session_count"
  local count = select("#", ...)
  check_arity(fname, 2, count)
  local cidr, servicename = ...
  optional_string(fname, 1, "cidr", cidr)
  optional_string(fname, 2, "servicename", servicename)
  return query(fname, with_client(call_text(fname, fname, { cidr, servicename }, count)))
end)

local OPTION_TYPES = {
  startv = "integer",
  endv = "integer",
  cidr = "string",
  cluster = "boolean",
}

local function windowed(series)
  local fname = "msys.audit." .. series
  return public(function(...)
    local count = select("#", ...)
    check_arity(fname, 2, count)
    local monitor, options = ...
    if type(monitor) ~= "string" then
      bad_argument(fname, 1, "monitor", "string (a configured monitor such as \"300,6\")", monitor)
    end
    if type(options) == "table" then
      for key, value in pairs(options) do
        local expected = OPTION_TYPES[key]
        if not expected then
          raise(string.format("%s: unknown option %s (startv, endv, cidr, cluster)",
            fname, type(key) == "string" and quote_string(key) or tostring(key)))
        end
        local fits = (expected == "integer" and is_integer(value) and value >= 0)
            or type(value) == expected
        if not fits then
          raise(string.format("%s: option %s: %s expected, got %s", fname, key,
            expected == "integer" and "non-negative integer" or expected, describe_type(value)))
        end
      end
    elseif options ~= nil and type(options) ~= "string" then
      bad_argument(fname, 2, "options", "table, cidr string or nil", options)
    end
    return query(fname, with_client(call_text(fname, fname, { monitor, options }, count)))
  end)
end

-- msys.audit.connections|receptions|rejections(monitor, options)
audit.connections = windowed("connections")
audit.receptions = windowed("receptions")
audit.rejections = windowed("rejections")

---------------------------------------------------------------------------
-- ac: the accept construct of one client connection.

local AcceptConstruct = {}
AcceptConstruct.__index = AcceptConstruct

function AcceptConstruct.__tostring(ac)
  return "accept_construct(" .. context_prefix(ac.ip, ac.local_port):sub(2, -2) .. ")"
end

-- ac:inbound_session_count(cidr, service_type)
AcceptConstruct.inbound_session_count = public(function(...)
  local fname = "ac:inbound_session_count"
  local ac = ...
  if getmetatable(ac) ~= AcceptConstruct then
    raise(fname .. ": call it as ac:inbound_session_count(...) on an object from msys.audit.accept_construct")
  end
  local count = select("#", ...) - 1
  check_arity(fname, 2, count)
  local cidr, service_type = select(2, ...)
  optional_string(fname, 1, "cidr", cidr)
  optional_string(fname, 2, "service_type", service_type)
  return query(fname, context_prefix(ac.ip, ac.local_port)
    .. call_text(fname, fname, { cidr, service_type }, count))
end)

-- msys.audit.accept_construct(ip[, local_port]): an `ac` for a client
-- connection from `ip` to the listener on `local_port`.
audit.accept_construct = public(function(ip, local_port, ...)
  local fname = "msys.audit.accept_construct"
  check_arity(fname, 2, select("#", ...) + 2)
  local bare, why = normalize_ip(ip)
  if not bare then
    raise(string.format("%s: bad argument #1 (ip): %s", fname, why))
  end
  check_port(fname, 2, local_port)
  return setmetatable({ ip = bare, local_port = local_port }, AcceptConstruct)
end)

---------------------------------------------------------------------------
-- Host glue and extras.

-- msys.audit.set_client(ip[, local_port]): the connecting client that relative
-- forms ("/24", no cidr) refer to; set_client(nil) clears it.
audit.set_client = public(function(ip, local_port, ...)
  local fname = "msys.audit.set_client"
  check_arity(fname, 2, select("#", ...) + 2)
  if ip == nil then
    client = nil
    return
  end
  local bare, why = normalize_ip(ip)
  if not bare then
    raise(string.format("%s: bad argument #1 (ip): %s", fname, why))
  end
  check_port(fname, 2, local_port)
  client = { ip = bare, port = local_port }
end)

-- msys.audit.get_client(): the ip and local port set by set_client, or nil.
function audit.get_client()
  if client then
    return client.ip, client.port
  end
  return nil
end

local SERIES = { receptions = true, rejections = true }

-- msys.audit.add(series, ip, n): report n (default 1) messages received or
-- rejected from ip (default: the client from set_client); returns the count
-- in the current window of the agent's first monitor.
audit.add = public(function(series, ip, n, ...)
  local fname = "msys.audit.add"
  check_arity(fname, 3, select("#", ...) + 3)
  if not SERIES[series] then
    raise(string.format("%s: bad argument #1 (series): \"receptions\" or \"rejections\" expected, got %s",
      fname, type(series) == "string" and quote_string(series) or describe_type(series)))
  end
  if ip == nil then
    if not client then
      raise(fname .. ": bad argument #2 (ip): no ip given and no client set (msys.audit.set_client)")
    end
    ip = client.ip
  end
  local bare, why = normalize_ip(ip)
  if not bare then
    raise(string.format("%s: bad argument #2 (ip): %s", fname, why))
  end
  if n == nil then
    n = 1
  elseif not is_integer(n) or n < 1 or n > 4294967295 then
    bad_argument(fname, 3, "n", "integer from 1 to 4294967295", n)
  end
  return query(fname, string.format("add %s %s %d", series, bare, n), false)
end)

-- msys.audit.configure{socket = "/path", timeout = seconds}: change the agent
-- socket (nil key: unchanged; socket = false: back to INBOUND_AUDIT_SOCKET or
-- the default) or the timeout of each send/receive. A new socket closes the
-- current connection. Returns the settings now in effect.
audit.configure = public(function(options, ...)
  local fname = "msys.audit.configure"
  check_arity(fname, 1, select("#", ...) + 1)
  if options ~= nil and type(options) ~= "table" then
    bad_argument(fname, 1, "options", "table", options)
  end
  options = options or {}
  for key in pairs(options) do
    if key ~= "socket" and key ~= "timeout" then
      raise(string.format("%s: unknown option %s (socket, timeout)", fname, tostring(key)))
    end
  end
  local new_socket, new_timeout = options.socket, options.timeout
  if new_socket ~= nil and new_socket ~= false
      and (type(new_socket) ~= "string" or new_socket == "") then
    raise(fname .. ": socket: a path (string) or false expected, got " .. describe_type(new_socket))
  end
  if new_timeout ~= nil and (type(new_timeout) ~= "number" or not (new_timeout > 0)) then
    raise(fname .. ": timeout: a positive number of seconds expected, got " .. tostring(new_timeout))
  end
  if new_socket ~= nil then
    settings.socket_path = new_socket or nil
    disconnect()
  end
  if new_timeout ~= nil then
    settings.timeout = new_timeout
    if connection then
      connection:settimeout(new_timeout)
    end
  end
  return { socket = socket_path(), timeout = settings.timeout }
end)

-- msys.audit.disconnect(): close the agent connection (the next call opens a
-- new one), e.g. in a child after fork.
audit.disconnect = disconnect

-- msys.audit.stats(): connects (connections opened), reconnects (retries
-- after a transport failure) and requests sent, for monitoring the glue.
function audit.stats()
  return {
    connects = counters.connects,
    reconnects = counters.reconnects,
    requests = counters.requests,
    connected = connection ~= nil,
    socket = socket_path(),
  }
end

-- For an embedding host: a function answering one request line as the agent
-- would (nil: back to the socket).
function audit._set_transport(answer)
  in_process = answer
end

-- For tests: the raw LuaSocket object of the current connection (or nil).
function audit._connection()
  return connection
end

-- For tests and debugging: the request text a call would send, without sending it.
audit._serialize = public(function(value)
  return serialize("msys.audit._serialize", value)
end)

return audit
