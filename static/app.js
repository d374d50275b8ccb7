// Shows the numbers the server pushes, newest first: a list, a small chart and
// the state of the connection.
//
// The page (numberPage) knows nothing about how the numbers arrive: a
// transport hands it each message and each change of state. There are two,
// chosen by the page's data-transport: Socket.IO (connectSocketIO) and
// Server-Sent Events (connectEventSource).
//
// A signed-in page also shows the user's own notifications (notificationPanel),
// over the same Socket.IO connection or their own event stream, and a form that
// sends the user a notification (connectNotifyForm).
'use strict';

const SVG_NS = 'http://www.w3.org/2000/svg';
const CHART_MAX = 10; // the numbers are in [0, 10)
// Milliseconds between attempts to reconnect: at most the server's SSE retry hint
// (sse.RECONNECT_DELAY), so that the page is live again soon after a restart.
const RECONNECT_DELAY = 2000;

// Numbers with their 3 decimals; any other value (a fork's data) as plain text.
function formatValue(value) {
  return typeof value === 'number' ? value.toFixed(3) : String(value);
}

// One bar per value, newest on the right, on a scale of 0 to CHART_MAX.
// A value that is not a number leaves its slot empty.
function drawChart(svg, values, slots) {
  const box = svg.viewBox.baseVal;
  const slotWidth = box.width / slots;
  const firstSlot = slots - values.length;
  $(svg).find('.bar').remove();
  values.forEach(function (value, index) {
    if (typeof value !== 'number' || !isFinite(value)) {
      return;
    }
    const height = box.height * Math.min(Math.max(value / CHART_MAX, 0), 1);
    const bar = document.createElementNS(SVG_NS, 'rect');
    bar.setAttribute('class', 'bar');
    bar.setAttribute('x', (firstSlot + index) * slotWidth + slotWidth * 0.1);
    bar.setAttribute('width', slotWidth * 0.8);
    bar.setAttribute('y', box.height - height);
    bar.setAttribute('height', height);
    svg.appendChild(bar);
  });
}

// Say, as text, that some messages were missed for good: the server sent a gap
// signal, {after: N, before: M}, as the page resumed from an id it no longer keeps.
function showGap($notice, what, gap) {
  const count = gap.before - gap.after - 1;
  $notice
    .text('Missed while this page was away: ' + count + ' ' + what + ' (after #' + gap.after + ', before #' + gap.before + ').')
    .prop('hidden', false);
}

// The page: a list item and a bar for each new message, and the connection state.
function numberPage($feed) {
  const $numbers = $feed.find('#numbers');
  const $state = $feed.find('#state');
  const $missed = $feed.find('#missed');
  const chart = $feed.find('#chart')[0];
  const historySize = Number($feed.data('history-size'));
  const field = $feed.data('value'); // the field of a message that holds the value
  let stream = null; // the stream the shown numbers come from
  let lastId = 0; // the newest id shown
  let values = []; // the shown values, oldest first

  function showState(state) {
    $state.text(state).attr('data-state', state);
  }

  function showNumber(message) {
    if (message.stream !== stream) {
      // The server restarted: its ids begin again, so start the page afresh.
      stream = message.stream;
      lastId = 0;
      values = [];
      $numbers.empty();
    }
    if (message.id <= lastId) {
      return; // already shown
    }
    lastId = message.id;
    $('<li>')
      .text(formatValue(message[field])) // as text, never as HTML
      .attr('data-id', message.id)
      .prependTo($numbers);
    $numbers.children().slice(historySize).remove();
    values = values.concat([message[field]]).slice(-historySize);
    drawChart(chart, values, historySize);
  }

  // Where the page is in the stream, for a transport to resume from.
  function position() {
    return { stream: stream, lastId: lastId };
  }

  return {
    showNumber: showNumber,
    showState: showState,
    showGap: function (gap) { showGap($missed, 'numbers', gap); },
    position: position,
  };
}

// The signed-in user's notifications, newest first: the time and the text of each.
function notificationPanel($panel, historySize) {
  const $inbox = $panel.find('#inbox');
  const $missed = $panel.find('#notifications-missed');
  let stream = null; // the stream of the user's ids the shown notifications come from
  let lastId = 0; // the newest id shown

  function showNotification(message) {
    if (message.stream !== stream) {
      // The user's ids began again (the server forgot them, or restarted).
      stream = message.stream;
      lastId = 0;
      $inbox.empty();
    }
    if (message.id <= lastId) {
      return; // already shown
    }
    lastId = message.id;
    const sent = new Date(message.time * 1000);
    const $item = $('<li>').attr('data-id', message.id);
    $('<time>').attr('datetime', sent.toISOString()).text(sent.toLocaleTimeString()).appendTo($item);
    $('<span>').addClass('text').text(message.text).appendTo($item); // as text, never as HTML
    $item.prependTo($inbox);
    $inbox.children().slice(historySize).remove();
  }

  // Where the panel is in the user's notifications, for a transport to resume from.
  function position() {
    return { stream: stream, lastId: lastId };
  }

  return {
    showNotification: showNotification,
    showGap: function (gap) { showGap($missed, 'notifications', gap); },
    position: position,
  };
}

// The form that sends the user a notification over Socket.IO; the server's
// acknowledgement is {id: N} or {error: "..."}, shown beside it as text.
function connectNotifyForm($form, socket, event) {
  const $text = $form.find('input[name=text]');
  const $result = $form.find('#notify-result');
  $form.on('submit', function (submitted) {
    submitted.preventDefault();
    socket.emit(event, { text: $text.val() }, function (answer) {
      if (answer.error) {
        $result.text(answer.error).attr('data-result', 'error');
      } else {
        $result.text('Sent as #' + answer.id + '.').attr('data-result', 'sent');
        $text.val('');
      }
    });
  });
}

// Receive the numbers over Socket.IO and hand them to the page; with an inbox
// (a signed-in page), the user's notifications too. Return the socket.
function connectSocketIO(page, namespace, event, path, inbox) {
  // The client's default transports: long-polling first, which works through any
  // network and proxy, then an upgrade to a WebSocket wherever one gets through.
  const socket = io(namespace, {
    path: path, // under the app's own path, which is not the root behind a proxy that serves it under a sub-path
    // Sent on every connect and reconnect, so that the server sends only what we missed.
    auth: function (send) {
      const at = page.position();
      const data = at.stream ? { last_id: at.lastId, stream: at.stream } : {};
      const mine = inbox ? inbox.panel.position() : {};
      if (mine.stream) {
        data.last_notification_id = mine.lastId;
        data.notification_stream = mine.stream;
      }
      send(data);
    },
    // Retry at least every RECONNECT_DELAY (the default backs off to 5 s).
    reconnectionDelayMax: RECONNECT_DELAY,
  });

  // Connected, or connected again after a loss: the server sends what we missed.
  socket.on('connect', function () {
    page.showState('live');
  });

  // The connection dropped; the client retries on its own unless the server
  // ended it on purpose, in which case we ask again.
  socket.on('disconnect', function (reason) {
    page.showState('reconnecting');
    if (reason === 'io server disconnect') {
      socket.connect();
    }
  });

  // A connection attempt failed; the client keeps retrying.
  socket.on('connect_error', function () {
    page.showState(navigator.onLine ? 'reconnecting' : 'offline');
  });

  // Each broadcast, and on connect the history we have not seen yet.
  socket.on(event, page.showNumber);

  // On a resume from an id the server no longer keeps, before that history.
  socket.on(page.gapEvent, function (gap) {
    if (gap.channel === 'numbers') {
      page.showGap(gap);
    } else if (inbox) {
      inbox.panel.showGap(gap);
    }
  });

  if (inbox) {
    socket.on(inbox.event, inbox.panel.showNotification);
  }

  showNetworkChanges(page, function () { return socket.connected; });
  return socket;
}

// Receive the user's notifications as Server-Sent Events and hand them to the panel.
function connectNotificationSource(panel, url, event, gapEvent) {
  let source = null;

  // As connectEventSource: the browser resumes within one EventSource; a new one resumes from the panel.
  function connect() {
    const at = panel.position();
    source = new EventSource(at.stream ? url + '?last_id=' + at.lastId : url);
    source.addEventListener(event, function (message) {
      panel.showNotification(JSON.parse(message.data));
    });
    source.addEventListener(gapEvent, function (message) {
      panel.showGap(JSON.parse(message.data));
    });
    source.addEventListener('error', function () {
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(connect, RECONNECT_DELAY);
      }
    });
  }

  connect();
}

// Receive the numbers as Server-Sent Events and hand them to the page.
function connectEventSource(page, url, event) {
  let source = null;

  // Open a new stream from where the page is (from the start, the first time).
  // Within one EventSource the browser resumes by itself: it reconnects and sends
  // the last id it received as Last-Event-ID.
  function connect() {
    const at = page.position();
    source = new EventSource(at.stream ? url + '?last_id=' + at.lastId : url);

    // Connected, or reconnected by the browser: the server sends what we missed.
    source.addEventListener('open', function () {
      page.showState('live');
    });

    // Each broadcast, and on connect the history we have not seen yet.
    source.addEventListener(event, function (message) {
      page.showNumber(JSON.parse(message.data));
    });

    // The connection dropped or an attempt failed. While CONNECTING the browser
    // retries on its own; CLOSED (an answer other than an event stream, such as
    // a proxy's 502) means it gave up, so we open a new stream after a delay.
    source.addEventListener('error', function () {
      if (source.readyState === EventSource.CLOSED) {
        page.showState('offline');
        setTimeout(connect, RECONNECT_DELAY);
      } else {
        page.showState(navigator.onLine ? 'reconnecting' : 'offline');
      }
    });
  }

  connect();
  showNetworkChanges(page, function () { return source.readyState === EventSource.OPEN; });
}

// Show at once when the browser loses or regains the network; ``connected``
// says whether the transport's connection is up.
function showNetworkChanges(page, connected) {
  $(window).on('offline', function () { page.showState('offline'); });
  $(window).on('online', function () { page.showState(connected() ? 'live' : 'reconnecting'); });
}

$(function () {
  const $feed = $('#feed');
  const page = numberPage($feed);
  page.gapEvent = $feed.data('gap-event');
  const $panel = $feed.find('#notifications[data-signed-in="yes"]');
  const panel = $panel.length ? notificationPanel($panel, Number($feed.data('history-size'))) : null;
  if ($feed.data('transport') === 'sse') {
    connectEventSource(page, $feed.data('stream-url'), $feed.data('event'));
    if (panel) {
      connectNotificationSource(panel, $panel.data('stream-url'), $panel.data('event'), page.gapEvent);
    }
  } else {
    const inbox = panel ? { panel: panel, event: $panel.data('event') } : null;
    const socket = connectSocketIO(page, $feed.data('namespace'), $feed.data('event'), $feed.data('socketio-path'), inbox);
    if (panel) {
      connectNotifyForm($panel.find('#notify-me'), socket, $panel.data('notify-event'));
    }
  }
});
