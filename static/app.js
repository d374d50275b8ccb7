// Shows the numbers the server pushes over Socket.IO, newest first.
'use strict';

$(function () {
  const $feed = $('#feed');
  const $numbers = $('#numbers');
  const $state = $('#state');
  const historySize = Number($feed.data('history-size'));
  const event = $feed.data('event');

  // Where we are in the stream, sent back to the server on every reconnect so
  // that it sends only what we missed.
  let stream = null;
  let lastId = 0;

  const socket = io($feed.data('namespace'), {
    auth: function (send) {
      send(stream ? { last_id: lastId, stream: stream } : {});
    },
  });

  function showState(state) {
    $state.text(state).attr('data-state', state);
  }

  function showNumber(message) {
    if (message.stream !== stream) {
      // The server restarted: its ids begin again, so start the list afresh.
      stream = message.stream;
      lastId = 0;
      $numbers.empty();
    }
    if (message.id <= lastId) {
      return; // already shown
    }
    lastId = message.id;
    $('<li>')
      .text(message.number.toFixed(3))  // as text, never as HTML
      .attr('data-id', message.id)
      .prependTo($numbers);
    $numbers.children().slice(historySize).remove();
  }

  // Connected, or connected again after a loss: the server sends what we missed.
  socket.on('connect', function () {
    showState('live');
  });

  // The connection dropped; the client retries on its own unless the server
  // ended it on purpose, in which case we ask again.
  socket.on('disconnect', function (reason) {
    showState('reconnecting');
    if (reason === 'io server disconnect') {
      socket.connect();
    }
  });

  // A connection attempt failed; the client keeps retrying.
  socket.on('connect_error', function () {
    showState(navigator.onLine ? 'reconnecting' : 'offline');
  });

  // Each broadcast, and on connect the history we have not seen yet.
  socket.on(event, showNumber);

  $(window).on('offline', function () { showState('offline'); });
  $(window).on('online', function () { showState(socket.connected ? 'live' : 'reconnecting'); });
});
