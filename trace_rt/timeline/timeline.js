// Clicking an event (on the track or in the list) seeks the player to its start; the
// state is kept on window.traceTimeline so that tests and users can read it.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("trace-data").textContent);
  var player = document.getElementById("player");
  var cursor = document.querySelector(".track .cursor");
  var state = { data: data, seeks: [], lastSeek: null, hasPlayer: !!player };
  window.traceTimeline = state;

  function seek(t) {
    if (!isFinite(t)) return;
    state.seeks.push(t);
    state.lastSeek = t;
    if (player) {
      player.currentTime = t;
      showCursor(t);
    }
  }
  function showCursor(t) {
    if (!cursor || !(data.duration > 0)) return;
    cursor.hidden = false;
    cursor.style.left = Math.min(100, 100 * t / data.duration) + "%";
  }
  document.querySelectorAll(".event[data-start], .event-row[data-start]").forEach(function (el) {
    el.addEventListener("click", function () {
      if (el.dataset.start !== "") seek(parseFloat(el.dataset.start));
    });
  });
  document.querySelectorAll(".thumb").forEach(function (el) {
    el.addEventListener("click", function () { seek(parseFloat(el.dataset.time)); });
  });
  if (player) {
    player.addEventListener("timeupdate", function () { showCursor(player.currentTime); });
  }
})();
