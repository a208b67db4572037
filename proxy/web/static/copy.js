// The portal's one script: a "Copy" button next to a code. Everything works without it (the
// buttons stay hidden); the code can always be selected and copied by hand.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  if (!navigator.clipboard || !window.isSecureContext) {
    return;
  }
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    var target = document.getElementById(button.getAttribute("data-copy"));
    var status = button.parentElement.querySelector(".copy-status");
    if (!target) {
      return;
    }
    button.hidden = false;
    button.addEventListener("click", function () {
      var text = target.tagName === "OL"
        ? Array.from(target.querySelectorAll("li")).map(function (li) { return li.textContent.trim(); }).join("\n")
        : target.textContent.trim();
      navigator.clipboard.writeText(text).then(function () {
        if (status) { status.textContent = "Copied."; }
      }, function () {
        if (status) { status.textContent = "Could not copy: select the text and copy it by hand."; }
      });
    });
  });
});
