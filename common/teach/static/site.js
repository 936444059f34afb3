// densenet teach: switch a row (or every row) between the four columns and one framework.
// Plain script, no library: the page must work from disk without a network.
(function () {
  "use strict";

  var VIEWS = ["all", "torch", "mxnet", "jax", "tf"];

  function setView(row, view) {
    if (VIEWS.indexOf(view) < 0) {
      return;
    }
    row.setAttribute("data-view", view);
    var buttons = row.querySelectorAll(".switch button");
    for (var i = 0; i < buttons.length; i++) {
      var pressed = buttons[i].getAttribute("data-view") === view;
      buttons[i].setAttribute("aria-pressed", pressed ? "true" : "false");
    }
  }

  function onClick(event) {
    var button = event.target.closest("button[data-view]");
    if (!button) {
      return;
    }
    var group = button.closest(".switch");
    var view = button.getAttribute("data-view");
    var target = group.getAttribute("data-target");
    if (target === "*") {
      // Every row follows the global switch; the global buttons show it as well.
      var rows = document.querySelectorAll("section.row");
      for (var i = 0; i < rows.length; i++) {
        setView(rows[i], view);
      }
      var own = group.querySelectorAll("button");
      for (var j = 0; j < own.length; j++) {
        own[j].setAttribute("aria-pressed", own[j] === button ? "true" : "false");
      }
      return;
    }
    var row = document.getElementById(target);
    if (row) {
      setView(row, view);
    }
  }

  document.addEventListener("click", onClick);
  document.documentElement.classList.add("js");
})();
