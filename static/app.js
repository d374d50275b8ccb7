// Shows the numbers the server pushes, newest first: a list, a small chart and
// the state of the connection.
//
// The page (numberPage) knows nothing about how the numbers arrive: a
// transport hands it each message and each change of state. There are two,
// chosen by the page's data-transport: Socket.IO (connectSocketIO) and
// Server-Sent Events (connectEventSource).
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

// The page: a list item and a bar for each new message, and the connection state.
function numberPage($feed) {
  const $numbers = $feed.find('#numbers');
  const $state = $feed.find('#state');
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

  return { showNumber: showNumber, showState: showState, position: position };
}

// Receive the numbers over Socket.IO and hand them to the page.
function connectSocketIO(page, namespace, event, path) {
  // The client's default transports: long-polling first, which works through any
  // network and proxy, then an upgrade to a WebSocket wherever one gets through.
  const socket = io(namespace, {
    path: path, // under the app's own path, which is not the root behind a proxy that serves it under a sub-path
    // Sent on every connect and reconnect, so that the server sends only what we missed.
    auth: function (send) {
      const at = page.position();
      send(at.stream ? { last_id: at.lastId, stream: at.stream } : {});
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

  showNetworkChanges(page, function () { return socket.connected; });
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
  if ($feed.data('transport') === 'sse') {
    connectEventSource(page, $feed.data('stream-url'), $feed.data('event'));
  } else {
    connectSocketIO(page, $feed.data('namespace'), $feed.data('event'), $feed.data('socketio-path'));
  }
});
