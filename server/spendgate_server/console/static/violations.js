// spendgate console: the live alerts feed. Loaded from the console's own origin (the CSP allows
// no inline script); without it the Violations page is a plain paged list.
//
// The server renders each violation (the same markup as the list) and sends it as a
// server-sent event whose id is the violation's cursor. When the connection drops, the browser
// reconnects by itself with Last-Event-ID set to the last cursor received, and the server
// resumes the watch right after it: nothing is missed and nothing is repeated. Each new
// violation also counts in its row of the summary (data-group); a kind the summary does not
// have yet is mentioned, and appears grouped on the next load.
"use strict";

(function () {
  const list = document.getElementById("violations");
  const status = document.getElementById("live-status");
  if (!list || !status || !list.dataset.stream || typeof EventSource === "undefined") {
    return;
  }
  let added = 0;
  let ungrouped = 0;
  const say = (text) => {
    status.textContent = text;
  };
  const counted = () =>
    (added === 0 ? "" : ` ${added} new since the page opened.`) +
    (ungrouped === 0 ? "" : ` ${ungrouped} of a new kind: reload to see them grouped.`);

  // Count the violation in its summary row, if the summary has one for its kind.
  const countInGroup = (item) => {
    const rows = document.querySelectorAll("tr[data-group]");
    const row = Array.from(rows).find((r) => r.dataset.group === item.dataset.group);
    const cell = row && row.querySelector(".group-count");
    if (!cell) {
      const empty = document.getElementById("summary-empty");
      if (empty) {
        empty.textContent = `${added} found since the page opened: reload to see them grouped.`;
      } else {
        ungrouped += 1;
      }
      return;
    }
    cell.textContent = String(Number(cell.textContent) + 1);
    cell.classList.add("is-new");
  };

  const source = new EventSource(list.dataset.stream);
  say("Connecting to the live feed…");

  source.addEventListener("open", () => {
    say("Live: new violations appear at the top as they are found." + counted());
  });

  source.addEventListener("violation", (event) => {
    // A <template> parses the server's (escaped) markup without running anything in it.
    const template = document.createElement("template");
    template.innerHTML = event.data;
    const item = template.content.firstElementChild;
    if (!item || !item.id || document.getElementById(item.id)) {
      return;
    }
    item.classList.add("is-new");
    list.prepend(item);
    const empty = document.getElementById("violations-empty");
    if (empty) {
      empty.remove();
    }
    added += 1;
    countInGroup(item);
    say("Live: new violations appear at the top as they are found." + counted());
  });

  // The server ends the feed for good (the session ended, or the service refused the watch).
  source.addEventListener("ended", (event) => {
    source.close();
    say(`Live updates stopped: ${event.data} Reload the page to start again.`);
  });

  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      say("Live updates stopped: reload the page (you may need to sign in again)." + counted());
    } else {
      say("Connection lost: reconnecting, and resuming where the feed left off…" + counted());
    }
  });
})();
