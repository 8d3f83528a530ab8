/* Live job status for admin (alkemy/admin_jobs.py): the status and progress cells of unfinished jobs
   are refreshed from the admin's status.json every 2 s; a change page reloads once when its job finishes,
   so outputs, identity scores and cost appear. Polling stops when every job on the page has finished. */
(function () {
  "use strict";
  var INTERVAL_MS = 2000;

  function cells() {
    return Array.prototype.slice.call(document.querySelectorAll("[data-job-status-url]"));
  }

  function jobId(cell) {
    return cell.getAttribute("data-job-status") || cell.getAttribute("data-job-progress");
  }

  function unfinished() {
    return cells().filter(function (cell) { return cell.getAttribute("data-job-done") !== "1"; });
  }

  function onChangePage() {
    return document.body.classList.contains("change-form");
  }

  function apply(jobs) {
    var finishedHere = false;
    cells().forEach(function (cell) {
      var job = jobs[jobId(cell)];
      if (!job) { return; }
      var wasDone = cell.getAttribute("data-job-done") === "1";
      cell.setAttribute("data-job-state", job.status);
      cell.setAttribute("data-job-done", job.terminal ? "1" : "0");
      cell.textContent = cell.hasAttribute("data-job-status") ? job.status : job.label;
      if (job.terminal && !wasDone) { finishedHere = true; }
    });
    return finishedHere;
  }

  function poll() {
    var pending = unfinished();
    if (!pending.length) { return; }
    var ids = {};
    pending.forEach(function (cell) { ids[jobId(cell)] = true; });
    var url = pending[0].getAttribute("data-job-status-url") + "?ids=" + Object.keys(ids).join(",");
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : { jobs: {} }; })
      .then(function (body) {
        if (apply(body.jobs) && onChangePage()) {
          window.location.reload();
          return;
        }
        window.setTimeout(poll, INTERVAL_MS);
      })
      .catch(function () { window.setTimeout(poll, INTERVAL_MS * 2); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (unfinished().length) { window.setTimeout(poll, INTERVAL_MS); }
  });
})();
