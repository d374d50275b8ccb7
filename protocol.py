"""The names other programs rely on: the app, its extras, the page, the tests and the benchmark take them from here.

A message is a JSON object: ``{VALUE: <the value>, "id": 1, 2, 3..., "time": <UNIX epoch seconds>,
"stream": <changes when the ids begin again>}`` (see the README, "The stream").
"""
NAMESPACE = "/test"  # the Socket.IO namespace of the stream
EVENT = "newnumber"  # the event (Socket.IO, and Server-Sent Events' "event:") that carries each message
VALUE = "number"  # the field of a message that holds the value next_number() made
LIVE_ROOM = "live"  # on the server, the Socket.IO room of the clients that have had their history
GAP_EVENT = "gap"  # sent first to a client that resumes from before the oldest message kept: it missed some
NOTIFICATION_EVENT = "notification"  # extras.notifications: carries one notification to its user alone
NOTIFY_EVENT = "notify_me"  # extras.notifications: a signed-in client sends itself a notification
