// Shows the numbers the server pushes, newest first: a list, a small chart and
// the state of the connection.
//
// The page (numberPage) knows nothing about how the numbers arrive: the
// transport (connectSocketIO) hands it each message and each change of state,
// and another transport could feed the same showNumber() and showState().
'use strict';

const SVG_NS = 'http://www.w3.org/2000/svg';
const CHART_MAX = 10; // the numbers are in [0, 10)

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
      .text(formatValue(message.number)) // as text, never as HTML
      .attr('data-id', message.id)
      .prependTo($numbers);
    $numbers.children().slice(historySize).remove();
    values = values.concat([message.number]).slice(-historySize);
    drawChart(chart, values, historySize);
  }

  // Where the page is in the stream, for a transport to resume from.
  function position() {
    return { stream: stream, lastId: lastId };
  }

  return { showNumber: showNumber, showState: showState, position: position };
}

// Receive the numbers over Socket.IO and hand them to the page.
function connectSocketIO(page, namespace, event) {
  const socket = io(namespace, {
    // Sent on every connect and reconnect, so that the server sends only what we missed.
    auth: function (send) {
      const at = page.position();
      send(at.stream ? { last_id: at.lastId, stream: at.stream } : {});
    },
    // Retry at least every 2 s (the default backs off to 5 s): live again soon after a restart.
    reconnectionDelayMax: 2000,
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

  $(window).on('offline', function () { page.showState('offline'); });
  $(window).on('online', function () { page.showState(socket.connected ? 'live' : 'reconnecting'); });
}

$(function () {
  const $feed = $('#feed');
  connectSocketIO(numberPage($feed), $feed.data('namespace'), $feed.data('event'));
});
